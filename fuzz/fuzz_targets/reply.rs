//! The CLI's reply parser: whatever comes back over the socket is a reply
//! or an error, never a panic, and a reply's body comes from the input.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = tokend::cli::parse_reply(data) {
        assert!(reply.body.len() <= data.len());
        let _ = reply.message();
    }
});
