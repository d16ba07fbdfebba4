//! What reaches `tokend authorize` from outside: the request heads the
//! loopback listener reads, the redirect's query, and what the user pastes.
//! No panic, no empty code, and nothing that could drive the terminal
//! (control characters) in what is printed.
//!
//! Input: a line with the listener's path, a line with our state, then the
//! text (a request head, a query, a paste: all three are tried).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokend::authorize::{self, Refusal};
use tokend::callback::{self, Asked};

fn printable(r: &Refusal) {
    let text = r.describe();
    assert!(!text.contains(char::is_control), "{text:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = input.splitn(3, '\n');
    let (Some(path), Some(state), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    if let Some(Asked::Answer(query)) = callback::asked(text, path) {
        assert!(authorize::is_answer(&query), "{query:?}");
    }
    match authorize::answer(text, state) {
        Ok(code) => assert!(!code.is_empty()),
        Err(r) => printable(&r),
    }
    match authorize::pasted(text, state) {
        Ok(p) if p.state_checked => assert!(!p.code.is_empty()),
        // A bare code is taken as it is.
        Ok(p) => assert_eq!(p.code.expose(), text),
        Err(why) => assert!(!why.contains(char::is_control), "{why:?}"),
    }
});
