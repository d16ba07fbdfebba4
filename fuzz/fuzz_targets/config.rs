//! The config parser: any text is a config or a list of problems, each
//! tied to a key where there is one and short enough to read (values are
//! cut, not repeated whole); never a panic, never an empty error; and a
//! config that parses holds no duration the refresher's arithmetic cannot take.

#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokend::config::{self, Env};

/// No environment and no secrets read, as `config::load_without_secrets`
/// loads: the target is the parser and the validation, not the file system.
struct Bare;

impl Env for Bare {
    fn var(&self, _: &str) -> Option<String> {
        None
    }

    fn read_secrets(&self) -> bool {
        false
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = match config::parse(text, Path::new("fuzz.toml"), &Bare) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.problems.is_empty(), "an error that names no problem");
            for p in &e.problems {
                assert!(!p.message.is_empty(), "a problem without a message: {p:?}");
                let line = p.to_string();
                assert!(line.len() <= 1024, "a problem of {} bytes", line.len());
            }
            let _ = e.to_string();
            return;
        }
    };
    // The refresher adds durations to instants in milliseconds (i64): the
    // config keeps them far from overflowing.
    let r = &c.refresh;
    let durations = [
        r.refresh_before_expiry,
        r.request_timeout,
        r.retry_initial,
        r.retry_max,
        r.min_remaining,
        r.rejected_cooldown,
    ];
    let hooks = c.sinks.iter().map(|s| s.on_change_timeout);
    for d in durations.into_iter().chain(hooks) {
        assert!(
            d <= Duration::from_secs(3650 * 86_400),
            "a duration of {d:?}"
        );
    }
});
