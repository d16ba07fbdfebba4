//! Wall-clock time as the store keeps it, and how the command line shows it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the unit of every instant in the store,
/// fine enough for test tokens that live a few seconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The last instant RFC 3339 can write, 9999-12-31T23:59:59.999Z, in ms.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// An instant within what can be shown: from the epoch to [`MAX_MS`]. The
/// store holds whatever was written to it (an older `import` took epoch
/// milliseconds for seconds and stored expiries past year 9999); what shows
/// an instant, or computes with one and `now`, takes it through this.
pub fn clamp(ms: i64) -> i64 {
    ms.clamp(0, MAX_MS)
}

/// [`clamp`] for an instant that may be unknown.
pub fn bounded(ms: Option<i64>) -> Option<i64> {
    ms.map(clamp)
}

/// RFC 3339 in UTC, whole seconds: the `expires_at` of the json sink.
/// Total: an instant before the epoch shows as the epoch, one past year
/// 9999 as the last second of 9999.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(clamp(ms) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A coarse, readable span: "45s", "12m", "5h", "364d".
pub fn span(ms: i64) -> String {
    span_secs(ms.unsigned_abs() / 1000)
}

fn span_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// "in 364d" for the future, "3m ago" for the past, relative to `now`.
pub fn relative(at: i64, now: i64) -> String {
    // The distance as a u64: any two i64 are at most u64::MAX apart.
    let d = at.abs_diff(now) / 1000;
    if at >= now {
        format!("in {}", span_secs(d))
    } else {
        format!("{} ago", span_secs(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_naturally() {
        assert_eq!(span(45_000), "45s");
        assert_eq!(span(12 * 60_000), "12m");
        assert_eq!(span(5 * 3_600_000), "5h");
        assert_eq!(span(31_535_999_000), "364d");
        assert_eq!(relative(1_000, 61_000), "60s ago");
        assert_eq!(relative(61_000, 1_000), "in 60s");
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_999), "2023-11-14T22:13:20Z");
    }

    /// Issue 10: an expiry written in milliseconds where seconds were meant
    /// lands past year 9999, which RFC 3339 cannot write; formatting it must
    /// still give a string, for every i64.
    #[test]
    fn formatting_is_total() {
        for (ms, shown) in [
            (i64::MIN, "1970-01-01T00:00:00Z"),
            (-1, "1970-01-01T00:00:00Z"),
            (MAX_MS, "9999-12-31T23:59:59Z"),
            (MAX_MS + 1, "9999-12-31T23:59:59Z"),
            // `import --expires-in 1767225600000` (epoch ms taken for seconds).
            (1_767_225_600_000 * 1000, "9999-12-31T23:59:59Z"),
            (i64::MAX, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(ms), shown, "{ms}");
        }
        let mut rng = fastrand::Rng::with_seed(10);
        let edges = [
            i64::MIN,
            i64::MIN + 1,
            -1,
            0,
            1,
            MAX_MS,
            i64::MAX - 1,
            i64::MAX,
        ];
        for _ in 0..10_000 {
            let a = match rng.u8(..4) {
                0 => edges[rng.usize(..edges.len())],
                1 => rng.i64(..),
                _ => rng.i64(..) >> rng.u32(..64),
            };
            let b = edges[rng.usize(..edges.len())];
            let t = rfc3339(a);
            assert!(t.len() == 20 && t.ends_with('Z'), "{a}: {t}");
            for s in [span(a), relative(a, b), relative(b, a)] {
                assert!(!s.is_empty(), "{a}, {b}");
            }
        }
        assert_eq!(
            relative(i64::MAX, i64::MIN),
            format!("in {}d", u64::MAX / 1000 / 86_400)
        );
        assert_eq!(
            relative(i64::MIN, i64::MAX),
            format!("{}d ago", u64::MAX / 1000 / 86_400)
        );
    }
}
