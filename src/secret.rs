//! A string that must never reach a log line, an error message or argv.

use std::fmt;

/// An access token, refresh token or client secret.
///
/// `Debug` and `Display` print `[redacted]`, so a secret that slips into a
/// `tracing` field or a `format!` shows nothing; reading the value takes an
/// explicit, greppable call to [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret's value, for the few places that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// [`expose`](Self::expose), handing the value over: the socket's
    /// answer takes the token's bytes without copying them again.
    pub fn into_exposed(self) -> String {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Replaces every occurrence of the given secrets in text that came from
/// outside (a provider's `error_description`, say), so that an echoing
/// provider cannot smuggle a token into our logs.
pub fn redact(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if s.0.len() >= 4 {
            out = out.replace(&s.0, "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2-token");
    }

    #[test]
    fn redact_removes_echoed_secrets() {
        let s = Secret::new("abcd1234");
        assert_eq!(
            redact("bad token abcd1234 given", &[&s]),
            "bad token [redacted] given"
        );
    }
}
