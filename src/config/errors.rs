//! What a problem's message may repeat from the file. Values are quoted
//! and cut, libraries' explanations cut, and toml's parse errors become
//! problems that name their key but never echo the offending line: it may
//! hold a secret, and these messages reach logs.

use std::fmt;

use super::Problem;

/// How much of a value from the file a message repeats.
pub(super) const SHOWN: usize = 64;
/// How much of a library's explanation (which may quote the value) a message keeps.
const EXPLAINED: usize = 200;

/// Text cut to `max` characters, "…" marking the cut: a megabyte pasted
/// into the file by mistake still gives a one-line error.
pub(super) fn cut(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => s.into(),
        Some((i, _)) => format!("{}…", &s[..i]).into(),
    }
}

/// A value from the file, quoted and cut, as messages show it.
pub(super) fn shown(s: &str) -> String {
    format!("{:?}", cut(s, SHOWN))
}

/// A library's error, cut.
pub(super) fn explained(e: impl fmt::Display) -> String {
    cut(&e.to_string(), EXPLAINED).into_owned()
}

/// A TOML error as a problem with a key, but without toml's excerpt of the
/// offending line: that line may hold a secret (`client_secret = "…"` is a
/// common slip), and these messages reach logs. Quoted values in the message
/// are elided for the same reason; names in backquotes (keys, numbers) are
/// cut to [`SHOWN`] characters.
pub(super) fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let mut message = String::new();
    // Inside "…" (elided) or `…` (cut): characters seen so far.
    let (mut quoted, mut backquoted) = (false, None::<usize>);
    for c in e.message().trim_end().chars() {
        match (c, quoted, backquoted) {
            ('"', false, None) => {
                quoted = true;
                message.push_str("\"…");
            }
            ('"', true, _) => {
                quoted = false;
                message.push('"');
            }
            (_, true, _) => {}
            ('`', false, None) => {
                backquoted = Some(0);
                message.push(c);
            }
            ('`', false, Some(_)) => {
                backquoted = None;
                message.push(c);
            }
            (_, false, Some(n)) => {
                if n < SHOWN {
                    message.push(c);
                } else if n == SHOWN {
                    message.push('…');
                }
                backquoted = Some(n + 1);
            }
            (_, false, None) => message.push(c),
        }
    }
    let Some(start) = e.span().map(|s| s.start.min(text.len())) else {
        return Problem {
            key: String::new(),
            message,
        };
    };
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    let line = text[line_start..].lines().next().unwrap_or_default();
    // A table header names the table: "[a.b]", "[[sinks]] # comment".
    fn header(l: &str) -> Option<&str> {
        let l = l.trim();
        l.starts_with('[').then(|| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
        })
    }
    // The key is what stands left of '='; the table, the last header above
    // (or the line itself, when the error is in a header).
    let (table, key) = match header(line) {
        Some(h) => (h, ""),
        None => (
            text[..line_start]
                .lines()
                .rev()
                .find_map(header)
                .unwrap_or(""),
            line.split_once('=').map(|(k, _)| k.trim()).unwrap_or(""),
        ),
    };
    let key = match (cut(table, SHOWN), cut(key, SHOWN)) {
        (t, k) if t.is_empty() => k.into_owned(),
        (t, k) if k.is_empty() => t.into_owned(),
        (t, k) => format!("{t}.{k}"),
    };
    Problem {
        key,
        message: format!("{message} (line {line_no}, column {column})"),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::problems;

    #[test]
    fn unknown_keys_are_named() {
        let e = problems("[refresh]\nretry_maxx = \"1m\"\n");
        assert!(
            e[0].starts_with("refresh.retry_maxx: unknown field"),
            "{e:?}"
        );
        assert!(e[0].contains("line 2"), "{e:?}");
    }

    #[test]
    fn parse_errors_never_echo_values() {
        let e = problems("[providers.x]\nclient_secret = \"hunter2-secret\"\n");
        assert!(e[0].starts_with("providers.x.client_secret: "), "{e:?}");
        assert!(!e[0].contains("hunter2"), "{e:?}");
        let e = problems("[refresh]\nmax_concurrency = \"hunter2-secret\"\n");
        assert!(
            e[0].starts_with("refresh.max_concurrency: invalid type"),
            "{e:?}"
        );
        assert!(!e[0].contains("hunter2"), "{e:?}");
    }

    #[test]
    fn errors_in_table_headers_name_the_table() {
        let e = problems("[refresh]\n[refresh]\n");
        assert!(e[0].starts_with("refresh: "), "{e:?}");
        let e = problems("[[sinks]] # x\npath = \"/a/{name}\"\nmode = 1\n");
        assert!(e[0].starts_with("sinks.mode: invalid type"), "{e:?}");
    }
}
