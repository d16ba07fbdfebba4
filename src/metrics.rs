//! Counters and histograms for `GET /metrics`, in the Prometheus text format.
//!
//! A handful of atomics written by hand: the prometheus crates would cost more
//! build time than the whole of this file is worth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Bucket upper bounds of the provider latency histogram, in seconds.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How a refresh ended.
#[derive(Clone, Copy)]
pub enum RefreshOutcome {
    Ok,
    Transient,
    Permanent,
    Misconfigured,
}

/// How a validation ended.
#[derive(Clone, Copy)]
pub enum ValidationOutcome {
    Ok,
    Unauthorized,
    Transient,
    /// A 403 from a token just refreshed for a 403: the account may not do
    /// this, whatever its token (a plan or permission problem).
    Forbidden,
}

/// Which provider endpoint a request went to. An outage remembers it with
/// each failure (src/refresher/outage.rs): one endpoint may fail while the
/// other answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Validate,
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, so an integer atomic can hold it.
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

/// Everything counted since start.
#[derive(Default)]
pub struct Metrics {
    refreshes: [AtomicU64; 4],
    validations: [AtomicU64; 4],
    latency: [Histogram; 2],
    /// Sink files that could not be written or removed: a full or read-only
    /// file system leaves consumers on an older token, worth an alert.
    publish_errors: AtomicU64,
    /// (route, status) → count. A mutex: socket requests are not the hot path
    /// of a counter, and the label set is small and fixed.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// The one pair that is a hot path, [`TOKEN_ROUTE`] answered 200: every
    /// token read over the socket. Counted without the lock, and merged
    /// into `requests` when rendered.
    tokens_served: AtomicU64,
}

/// The route template of a token read (README "The socket API").
pub const TOKEN_ROUTE: &str = "/v1/tokens/{name}";

/// One credential's gauges.
pub struct CredentialGauge<'a> {
    pub name: &'a str,
    pub state: &'static str,
    /// Seconds to expiry; None when unknown or without a token.
    pub expires_in: Option<f64>,
}

impl Metrics {
    pub fn refresh(&self, o: RefreshOutcome) {
        self.refreshes[o as usize].fetch_add(1, Relaxed);
    }

    pub fn validation(&self, o: ValidationOutcome) {
        self.validations[o as usize].fetch_add(1, Relaxed);
    }

    pub fn provider_latency(&self, e: Endpoint, d: Duration) {
        self.latency[e as usize].observe(d);
    }

    pub fn publish_errors(&self, n: usize) {
        if n > 0 {
            self.publish_errors.fetch_add(n as u64, Relaxed);
        }
    }

    pub fn socket_request(&self, route: &'static str, status: u16) {
        if status == 200 && route == TOKEN_ROUTE {
            self.tokens_served.fetch_add(1, Relaxed);
            return;
        }
        *self
            .requests
            .lock()
            .unwrap()
            .entry((route, status))
            .or_default() += 1;
    }

    /// Refreshes committed so far (for logs and tests of our own).
    pub fn refreshed(&self) -> u64 {
        self.refreshes[RefreshOutcome::Ok as usize].load(Relaxed)
    }

    /// The exposition, gauges first.
    pub fn render(&self, credentials: &[CredentialGauge<'_>]) -> String {
        let mut out = String::with_capacity(4096 + credentials.len() * 160);
        out.push_str("# HELP tokend_credential_expiry_seconds Seconds until the current access token expires.\n# TYPE tokend_credential_expiry_seconds gauge\n");
        for c in credentials {
            if let Some(s) = c.expires_in {
                let _ = writeln!(
                    out,
                    "tokend_credential_expiry_seconds{{credential=\"{}\"}} {s:.0}",
                    c.name
                );
            }
        }
        out.push_str("# HELP tokend_credential_state The credential's state (1 for the current one).\n# TYPE tokend_credential_state gauge\n");
        const STATES: [&str; 5] = [
            "valid",
            "refreshing",
            "retrying",
            "needs_reauthorization",
            "misconfigured",
        ];
        for c in credentials {
            for s in STATES {
                let _ = writeln!(
                    out,
                    "tokend_credential_state{{credential=\"{}\",state=\"{s}\"}} {}",
                    c.name,
                    u8::from(c.state == s)
                );
            }
        }
        out.push_str("# HELP tokend_refreshes_total Refresh attempts by outcome.\n# TYPE tokend_refreshes_total counter\n");
        for (i, o) in ["ok", "transient", "permanent", "misconfigured"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "tokend_refreshes_total{{outcome=\"{o}\"}} {}",
                self.refreshes[i].load(Relaxed)
            );
        }
        out.push_str("# HELP tokend_validations_total Validations by outcome.\n# TYPE tokend_validations_total counter\n");
        for (i, o) in ["ok", "unauthorized", "transient", "forbidden"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "tokend_validations_total{{outcome=\"{o}\"}} {}",
                self.validations[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tokend_publish_errors_total Token files that could not be written or removed.\n# TYPE tokend_publish_errors_total counter\ntokend_publish_errors_total {}",
            self.publish_errors.load(Relaxed)
        );
        out.push_str("# HELP tokend_provider_request_duration_seconds Provider request latency.\n# TYPE tokend_provider_request_duration_seconds histogram\n");
        for (i, e) in ["token", "validate"].iter().enumerate() {
            let h = &self.latency[i];
            for (b, bound) in h.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "tokend_provider_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"{bound}\"}} {}",
                    b.load(Relaxed)
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                out,
                "tokend_provider_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"+Inf\"}} {count}\n\
                 tokend_provider_request_duration_seconds_sum{{endpoint=\"{e}\"}} {}\n\
                 tokend_provider_request_duration_seconds_count{{endpoint=\"{e}\"}} {count}",
                h.sum_us.load(Relaxed) as f64 / 1e6
            );
        }
        out.push_str("# HELP tokend_socket_requests_total Socket API requests by route and status.\n# TYPE tokend_socket_requests_total counter\n");
        let mut requests = self.requests.lock().unwrap().clone();
        let served = self.tokens_served.load(Relaxed);
        if served > 0 {
            *requests.entry((TOKEN_ROUTE, 200)).or_default() += served;
        }
        for ((route, status), n) in &requests {
            let _ = writeln!(
                out,
                "tokend_socket_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::default();
        m.refresh(RefreshOutcome::Ok);
        m.validation(ValidationOutcome::Unauthorized);
        m.provider_latency(Endpoint::Token, Duration::from_millis(20));
        m.socket_request("/v1/tokens/{name}", 200);
        m.socket_request("/v1/tokens/{name}", 503);
        m.socket_request(TOKEN_ROUTE, 200);
        m.publish_errors(2);
        let text = m.render(&[CredentialGauge {
            name: "bot",
            state: "valid",
            expires_in: Some(99.4),
        }]);
        for line in [
            "tokend_credential_expiry_seconds{credential=\"bot\"} 99",
            "tokend_credential_state{credential=\"bot\",state=\"valid\"} 1",
            "tokend_credential_state{credential=\"bot\",state=\"retrying\"} 0",
            "tokend_refreshes_total{outcome=\"ok\"} 1",
            "tokend_validations_total{outcome=\"unauthorized\"} 1",
            "tokend_publish_errors_total 2",
            "tokend_provider_request_duration_seconds_bucket{endpoint=\"token\",le=\"0.025\"} 1",
            "tokend_provider_request_duration_seconds_bucket{endpoint=\"token\",le=\"0.01\"} 0",
            "tokend_provider_request_duration_seconds_count{endpoint=\"token\"} 1",
            "tokend_socket_requests_total{route=\"/v1/tokens/{name}\",status=\"200\"} 2",
            "tokend_socket_requests_total{route=\"/v1/tokens/{name}\",status=\"503\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        // The lock-free count and the map's make one series, not two.
        assert_eq!(text.matches("status=\"200\"}").count(), 1, "{text}");
    }
}
