//! Where log lines go and what they look like: human-readable text on a
//! terminal or in a file, journald's priority prefixes under systemd, or
//! JSON lines for log shippers. Always on stderr.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// The shape of log lines (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Timestamped text, coloured on a terminal.
    Text,
    /// Text without our own timestamps (journald stamps every line), each
    /// line starting with a priority journald understands: `<3>` error,
    /// `<4>` warning, `<6>` info, `<7>` debug and trace.
    Journal,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Parses `--log-format`.
    pub fn parse(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "journal" => Ok(LogFormat::Journal),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "--log-format {s:?}: expected text, journal or json"
            )),
        }
    }

    /// Without `--log-format`: journal if stderr is connected to the journal,
    /// text otherwise. systemd sets `JOURNAL_STREAM` to the device and inode
    /// of the stream it gave us; a child or a redirected stderr inherits the
    /// variable but not the stream, hence the comparison (sd-daemon(3)).
    pub fn detect() -> LogFormat {
        match (std::env::var("JOURNAL_STREAM"), stderr_id()) {
            (Ok(v), Some((dev, ino))) if v == format!("{dev}:{ino}") => LogFormat::Journal,
            _ => LogFormat::Text,
        }
    }
}

/// The device and inode of stderr.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The format in force, once [`init`] ran.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format in force, if logging was set up.
pub fn format() -> Option<LogFormat> {
    FORMAT.get().copied()
}

/// The log target under which tokio-postgres shows statement parameters.
const PG_PARAMETERS: &str = "tokio_postgres::query";

/// Logs to stderr in `format`; `RUST_LOG` overrides `default`.
/// tokio-cron-scheduler announces every start at INFO, so it is held to
/// warnings unless named. tokio-postgres logs every statement's parameters
/// (the PostgreSQL store's tokens among them) at DEBUG under
/// [`PG_PARAMETERS`]: held to INFO whatever `RUST_LOG` says, as the last
/// directive for that target replaces any earlier one.
pub fn init(default: &str, format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    let spec = if spec.contains("tokio_cron_scheduler") {
        spec
    } else {
        format!("{spec},tokio_cron_scheduler=warn")
    };
    let spec = format!("{spec},{PG_PARAMETERS}=info");
    let filter = EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},{PG_PARAMETERS}=info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Journal => builder
            .with_ansi(false)
            .event_format(Journal(format::format().without_time()))
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FORMAT.set(format);
    }
}

/// Wraps a formatter to put journald's priority prefix before every line of
/// an event: a message that spans lines stays at its priority throughout.
struct Journal<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        let priority = priority(*event.metadata().level());
        // The level is padded to five characters (" INFO"): no need here.
        for line in text.trim_start().lines() {
            writeln!(writer, "<{priority}>{line}")?;
        }
        Ok(())
    }
}

/// syslog priorities, as journald reads them from a line's `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}
