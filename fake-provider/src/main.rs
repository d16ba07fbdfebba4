//! `tokend-fake-provider`: the fake PandaDoc provider as a standalone server,
//! for benchmarks and for trying tokend by hand. Secrets go to files (mode
//! 0600), never to the terminal; control it over `/_admin/...`.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokend_fake_provider::{FakeProvider, Knobs};

const USAGE: &str = "\
tokend-fake-provider: a fake PandaDoc OAuth 2.0 provider

USAGE: tokend-fake-provider [OPTIONS]

OPTIONS:
  --listen ADDR                 address to serve on [default: 127.0.0.1:8900]
  --token-lifetime SECS         expires_in of access tokens [default: 31535999]
  --latency-ms MS               delay before answering token and validate requests [default: 0]
  --no-rotate                   refreshes keep the same refresh token
  --lenient                     a reused refresh token or code does not revoke its grant
  --client-id ID                the client to register [default: tokend-test-client]
  --client-secret-file PATH     read the client's secret from PATH (else one is generated)
  --write-client-secret PATH    write the generated secret to PATH (mode 0600)
  --grant-file PATH             mint a grant at start and write its refresh token to PATH (mode 0600)
  --help                        print this help

Prints `listening on http://ADDR` once serving; runs until SIGINT or SIGTERM.
Control routes: GET /_admin/stats, DELETE /_admin/stats, GET /_admin/requests,
GET|PUT /_admin/knobs, POST /_admin/grants, GET /_admin/grants/{id}.
";

/// The command line, parsed.
struct Options {
    listen: SocketAddr,
    knobs: Knobs,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    write_client_secret: Option<PathBuf>,
    grant_file: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        listen: SocketAddr::from(([127, 0, 0, 1], 8900)),
        knobs: Knobs::default(),
        client_id: None,
        client_secret_file: None,
        write_client_secret: None,
        grant_file: None,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(None),
            "--listen" => {
                let v = value()?;
                options.listen = v.parse().map_err(|_| {
                    format!("--listen: {v:?} is not an address like 127.0.0.1:8900")
                })?;
            }
            "--token-lifetime" => options.knobs.token_lifetime_secs = number(value()?)?,
            "--latency-ms" => options.knobs.latency_ms = number(value()?)?,
            "--no-rotate" => options.knobs.rotate_refresh_tokens = false,
            "--lenient" => options.knobs.strict_reuse = false,
            "--client-id" => options.client_id = Some(value()?),
            "--client-secret-file" => options.client_secret_file = Some(value()?.into()),
            "--write-client-secret" => options.write_client_secret = Some(value()?.into()),
            "--grant-file" => options.grant_file = Some(value()?.into()),
            other => return Err(format!("unknown option {other:?}; see --help")),
        }
    }
    Ok(Some(options))
}

/// Writes a secret to `path`, readable by its owner only.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: tighten it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    // No trailing newline: readers that do not trim still get the exact value.
    file.write_all(secret.as_bytes())
}

fn run(options: Options) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    // Signal handlers come first, so that a SIGTERM sent as soon as the
    // "listening" line appears still stops the provider cleanly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let (mut interrupt, mut terminate) = {
        let _context = runtime.enter();
        let handler = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        (
            handler(SignalKind::interrupt())?,
            handler(SignalKind::terminate())?,
        )
    };

    let provider = FakeProvider::start_on(options.listen, options.knobs)
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;

    let client_id = options
        .client_id
        .unwrap_or_else(|| provider.client_id().to_owned());
    let secret = match &options.client_secret_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("--client-secret-file {}: {e}", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        None => provider.client_secret().to_owned(),
    };
    if secret.is_empty() {
        return Err("the client secret file is empty".into());
    }
    provider.add_client(&client_id, &secret);
    match &options.write_client_secret {
        Some(path) => write_secret(path, &secret)
            .map_err(|e| format!("--write-client-secret {}: {e}", path.display()))?,
        None if options.client_secret_file.is_none() => eprintln!(
            "warning: the client secret was generated and not written anywhere; \
             pass --write-client-secret PATH to use the token endpoint"
        ),
        None => {}
    }
    if let Some(path) = &options.grant_file {
        let grant = provider.mint_grant(&client_id, "read+write");
        write_secret(path, &grant.refresh_token)
            .map_err(|e| format!("--grant-file {}: {e}", path.display()))?;
    }

    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", provider.url())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("stdout: {e}"))?;

    runtime.block_on(async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    });
    drop(provider);
    Ok(())
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)) {
        Ok(None) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(options)) => match run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("tokend-fake-provider: {message}");
                ExitCode::FAILURE
            }
        },
        Err(message) => {
            eprintln!("tokend-fake-provider: {message}");
            ExitCode::from(2)
        }
    }
}
