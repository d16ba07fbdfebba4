//! `tokend authorize`: onboarding, the authorization-code flow from the
//! command line (README "Commands"). Three ways for the code to reach us: the browser's
//! redirect to a loopback listener (the default), the redirect's address
//! pasted on stdin (`--paste`, for a browser on another machine), or a code
//! obtained some other way (`--code`). Or no code at all: the device flow
//! (`--device`, RFC 8628), where the user allows access on another device
//! and tokend polls the provider. Whatever goes wrong, nothing is stored:
//! the credential is written once, after the exchange, in one transaction.

use std::io::{BufRead, Read};
use std::time::Duration;

use reqwest::Url;

use super::Exit;
use super::args::{Authorize, Global};
use crate::authorize::{self, Request};
use crate::callback::{self, BindError, Listener};
use crate::clock::{now_ms, span};
use crate::config::{self, Config, ProviderConfig};
use crate::provider::{Client, DeviceWait, Failure, Tokens};
use crate::secret::Secret;
use crate::store::{Grant, NewCredential, StoreConn, StoreError};

/// How long the listener waits for the browser by default: time to log in
/// (and find the password), short enough not to leave a port open all day.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The most we read of a pasted address or a code on stdin.
const MAX_PASTE: u64 = 64 * 1024;

/// How the code reaches us.
enum Via {
    /// The browser's redirect to our loopback listener, within this long.
    Listen(Duration),
    /// The redirect's address (or the code), pasted on stdin.
    Paste,
    /// `--code CODE`, or `--code -` for stdin.
    Code(String),
    /// `--device`: no code; poll the provider while the user decides.
    Device,
}

pub fn run(global: &Global, args: &Authorize) -> Result<(), Exit> {
    let (name, provider) = (&args.name, &args.provider);
    let via = match (&args.code, args.paste, args.timeout) {
        // clap refuses --device with any of the three.
        _ if args.device => Via::Device,
        (Some(_), true, _) => {
            return Err(Exit::usage(
                "--code and --paste are two ways to give the code: choose one",
            ));
        }
        (Some(_), _, Some(_)) | (_, true, Some(_)) => {
            return Err(Exit::usage(
                "--timeout is how long the listener waits; --paste and --code do not listen",
            ));
        }
        (Some(c), false, None) => Via::Code(c.clone()),
        (None, true, None) => Via::Paste,
        (None, false, t) => Via::Listen(t.unwrap_or(DEFAULT_TIMEOUT)),
    };
    let path = global.config_path();
    let config = config::load(&path).map_err(Exit::config)?;
    let p = super::provider_config(&config, &path, provider)?;
    check_existing(&config, name, args.force)?;
    let flow = Flow {
        config: &config,
        p,
        name,
        force: args.force,
    };
    let done = match via {
        Via::Listen(timeout) => flow.listen(timeout)?,
        Via::Paste => flow.paste()?,
        Via::Code(from) => flow.code(&from)?,
        Via::Device => flow.device()?,
    };
    println!("{done}");
    Ok(())
}

/// Refuses a name in use unless `--force`, before anyone opens a browser.
fn check_existing(config: &Config, name: &str, force: bool) -> Result<(), Exit> {
    if config.database.file().is_some_and(|f| !f.exists()) {
        return Ok(());
    }
    let existing = StoreConn::open_config(config, false)
        .and_then(|s| s.get(name))
        .map_err(|e| Exit::failure(format!("cannot read the database: {e}")))?;
    match existing {
        None => Ok(()),
        Some(c) if force => {
            eprintln!(
                "{name} exists ({}): its tokens are replaced once the new ones are obtained",
                c.state.as_str()
            );
            Ok(())
        }
        Some(c) => Err(Exit::failure(format!(
            "a credential named {name:?} already exists ({}); add --force to replace its \
             tokens (they are replaced only once new ones are obtained)",
            c.state.as_str()
        ))),
    }
}

/// One run of the command: what it authorizes, and for which provider.
struct Flow<'a> {
    config: &'a Config,
    p: &'a ProviderConfig,
    name: &'a str,
    force: bool,
}

impl Flow<'_> {
    /// The redirect URI, which the authorization URL must carry.
    fn redirect_uri(&self) -> Result<&Url, Exit> {
        self.p.redirect_uri.as_ref().ok_or_else(|| {
            Exit::config_message(format!(
                "providers.{0}.redirect_uri is not set: set it to the redirect URI registered \
                 for the app, e.g. redirect_uri = \"http://127.0.0.1:8765/callback\" in \
                 [providers.{0}] (or exchange a code obtained elsewhere with --code)",
                self.p.name
            ))
        })
    }

    /// The default: wait for the browser's redirect on the loopback address.
    fn listen(&self, timeout: Duration) -> Result<String, Exit> {
        let redirect = self.redirect_uri()?;
        let Some(addrs) = callback::loopback_addrs(redirect) else {
            return Err(Exit::config_message(format!(
                "providers.{p}.redirect_uri {redirect} is not a loopback http address, so the \
                 browser's redirect cannot reach tokend. Register a redirect URI like \
                 http://127.0.0.1:8765/callback for the app and set redirect_uri to it, or keep \
                 this one and run with --paste (or --code CODE)",
                p = self.p.name
            )));
        };
        let request = Request::new(self.p, redirect).map_err(Exit::failure)?;
        runtime()?.block_on(async {
            let mut listener = Listener::bind(&addrs, redirect.path())
                .await
                .map_err(|e| self.bind_failure(e, redirect))?;
            println!(
                "Authorize {} with provider {}: open this URL in a browser, log in and allow access.\n\n\
                 {}\n\n\
                 Waiting up to {} for the browser to come back to {redirect} …\n\
                 If the browser runs on another machine, forward the port from there first:\n    \
                 ssh -N -L {port}:{host}:{port} {user}@{this}\n\
                 or stop this (Ctrl-C) and run the same command with --paste.",
                self.name,
                self.p.name,
                request.url,
                humantime::format_duration(timeout),
                port = addrs[0].port(),
                host = match addrs[0] {
                    std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
                    std::net::SocketAddr::V4(a) => a.ip().to_string(),
                },
                user = login_name(),
                this = hostname(),
            );
            let redirected = match tokio::time::timeout(timeout, listener.next()).await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(Exit::failure("nothing was stored: the listener stopped")),
                Err(_) => {
                    return Err(Exit::failure(format!(
                        "nothing was stored: no answer from the browser within {}. Run \
                         'tokend authorize' again (--timeout gives more time); for a browser on \
                         another machine, forward the port with ssh -L or use --paste",
                        humantime::format_duration(timeout)
                    )));
                }
            };
            drop(listener);
            let outcome = match authorize::answer(&redirected.query, &request.state) {
                Ok(code) => self.finish(&code, request.verifier.as_ref()).await,
                Err(refusal) => Err(Exit::failure(format!(
                    "nothing was stored: {}",
                    refusal.describe()
                ))),
            };
            match &outcome {
                Ok(done) => redirected.respond(true, done).await,
                Err(e) => redirected.respond(false, &e.message).await,
            }
            outcome
        })
    }

    fn bind_failure(&self, e: BindError, redirect: &Url) -> Exit {
        let why = if e.error.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "port {} is in use (another 'tokend authorize' still waiting?)",
                e.addr.port()
            )
        } else {
            e.error.to_string()
        };
        Exit::failure(format!(
            "nothing was stored: cannot listen on {} for the redirect to {redirect}: {why}. \
             Stop what holds the port, or run with --paste, or register another port for the \
             app and change providers.{}.redirect_uri to it",
            e.addr, self.p.name
        ))
    }

    /// `--paste`: the user copies the address the browser landed on.
    fn paste(&self) -> Result<String, Exit> {
        let redirect = self.redirect_uri()?;
        let request = Request::new(self.p, redirect).map_err(Exit::failure)?;
        println!(
            "Authorize {} with provider {}: open this URL in a browser (on any machine), log in \
             and allow access.\n\n\
             {}\n\n\
             The browser then goes to {redirect}?code=…; that page may fail to load, which is \
             fine.\nCopy the whole address from the browser's address bar, paste it here and \
             press Enter:",
            self.name, self.p.name, request.url,
        );
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take(MAX_PASTE)
            .read_line(&mut line)
            .map_err(|e| Exit::failure(format!("nothing was stored: cannot read stdin: {e}")))?;
        let pasted = authorize::pasted(line.trim(), &request.state)
            .map_err(|why| Exit::failure(format!("nothing was stored: {why}")))?;
        if !pasted.state_checked {
            eprintln!(
                "note: a bare code carries no state to check; paste the whole address to have it checked"
            );
        }
        runtime()?.block_on(self.finish(&pasted.code, request.verifier.as_ref()))
    }

    /// `--code`: a code obtained some other way, from argv or stdin.
    fn code(&self, from: &str) -> Result<String, Exit> {
        let code = if from == "-" {
            let mut text = String::new();
            std::io::stdin()
                .take(MAX_PASTE)
                .read_to_string(&mut text)
                .map_err(|e| Exit::usage(format!("--code -: cannot read stdin: {e}")))?;
            text
        } else {
            from.to_owned()
        };
        let code = code.trim();
        if code.is_empty() || code.contains(char::is_whitespace) {
            return Err(Exit::usage("--code: expected one authorization code"));
        }
        if self.p.pkce {
            eprintln!(
                "note: providers.{} has pkce = true, and this run did not start the \
                 authorization, so it has no code_verifier to send; if the provider insists on \
                 one, run 'tokend authorize' without --code",
                self.p.name
            );
        }
        runtime()?.block_on(self.finish(&Secret::new(code), None))
    }

    /// `--device`: the device authorization grant (RFC 8628). The device
    /// code is polled with at the interval the provider gives, 5 s further
    /// apart after each `slow_down` (§3.5), until tokens come, the user
    /// denies, or the code expires.
    fn device(&self) -> Result<String, Exit> {
        let Some(url) = &self.p.device_authorization_url else {
            let why = if self.p.preset.is_some() {
                " (PandaDoc has no device authorization flow)"
            } else {
                ""
            };
            return Err(Exit::config_message(format!(
                "providers.{p}.device_authorization_url is not set{why}: --device needs the \
                 provider's device authorization endpoint (RFC 8628). Set it if the provider \
                 has one, or onboard with the browser: 'tokend authorize {name} --provider {p}' \
                 (--paste for a browser on another machine)",
                p = self.p.name,
                name = self.name
            )));
        };
        let timeout = self.config.refresh.request_timeout;
        runtime()?.block_on(async {
            let client = Client::new().map_err(Exit::failure)?;
            let d = client
                .device_authorization(self.p, url, timeout)
                .await
                .map_err(|f| {
                    Exit::failure(format!(
                        "nothing was stored: the device authorization request failed: {}",
                        f.describe()
                    ))
                })?;
            println!(
                "Authorize {} with provider {}: on any device with a browser, open\n\n    {}\n\n\
                 and enter the code\n\n    {}\n{}\n\
                 Waiting up to {} for access to be allowed …",
                self.name,
                self.p.name,
                d.verification_uri,
                d.user_code,
                d.verification_uri_complete
                    .as_ref()
                    .map(|u| format!("\n(or open {u}, which carries the code)\n"))
                    .unwrap_or_default(),
                humantime::format_duration(d.expires_in),
            );
            let deadline = tokio::time::Instant::now() + d.expires_in;
            let mut interval = d.interval;
            let expired = || {
                Exit::failure(format!(
                    "nothing was stored: the code expired before access was allowed; run \
                     'tokend authorize {} --device' again for a new one",
                    self.name
                ))
            };
            loop {
                tokio::time::sleep(interval).await;
                if tokio::time::Instant::now() >= deadline {
                    return Err(expired());
                }
                match client.device_token(self.p, &d.device_code, timeout).await {
                    Ok(tokens) => return self.store(tokens),
                    Err(DeviceWait::Pending) => {}
                    // For the rest of the flow (RFC 8628 §3.5).
                    Err(DeviceWait::SlowDown) => interval += Duration::from_secs(5),
                    Err(DeviceWait::Denied) => {
                        return Err(Exit::failure(
                            "nothing was stored: access was denied at the provider",
                        ));
                    }
                    Err(DeviceWait::Expired) => return Err(expired()),
                    // §3.5: a 5xx or no answer asks for exponential backoff.
                    Err(DeviceWait::Failed(f @ Failure::Transient { .. })) => {
                        interval = (interval * 2).min(Duration::from_secs(60));
                        eprintln!(
                            "tokend: polling the provider failed ({}); trying again in {}",
                            f.describe(),
                            humantime::format_duration(interval)
                        );
                    }
                    Err(DeviceWait::Failed(f)) => {
                        return Err(Exit::failure(format!(
                            "nothing was stored: the provider refused the device code: {}; \
                             check client_id, the client secret and scope of providers.{}",
                            f.describe(),
                            self.p.name
                        )));
                    }
                }
            }
        })
    }

    /// Exchanges the code and stores the credential; returns what to tell
    /// the user.
    async fn finish(&self, code: &Secret, verifier: Option<&Secret>) -> Result<String, Exit> {
        let client = Client::new().map_err(Exit::failure)?;
        let tokens = client
            .exchange_code(self.p, code, verifier, self.config.refresh.request_timeout)
            .await
            .map_err(|f| self.exchange_failure(f))?;
        self.store(tokens)
    }

    fn exchange_failure(&self, f: Failure) -> Exit {
        let hint = match &f {
            Failure::Permanent { .. } => {
                "a code works once and for a few minutes only: run 'tokend authorize' again for \
                 a fresh one"
                    .to_owned()
            }
            Failure::Misconfigured { .. } => format!(
                "check client_id, the client secret, scope and redirect_uri of providers.{}",
                self.p.name
            ),
            Failure::Transient { .. } | Failure::Unauthorized | Failure::Forbidden => {
                "the code may be spent already: run 'tokend authorize' again".to_owned()
            }
        };
        Exit::failure(format!(
            "nothing was stored: the code exchange failed: {}; {hint}",
            f.describe()
        ))
    }

    fn store(&self, tokens: Tokens) -> Result<String, Exit> {
        let Some(refresh_token) = tokens.refresh_token else {
            return Err(Exit::failure(
                "nothing was stored: the provider answered without a refresh token, so tokend \
                 could not keep the credential fresh. Some providers issue one only when asked \
                 (e.g. authorize_params = { access_type = \"offline\", prompt = \"consent\" })",
            ));
        };
        let expires_at = tokens
            .expires_in
            .map(|d| now_ms() + d.as_millis().min(i64::MAX as u128) as i64);
        let new = NewCredential {
            name: self.name.to_owned(),
            provider: self.p.name.clone(),
            access_token: Some(tokens.access_token),
            grant: Grant::RefreshToken(refresh_token),
            scope: tokens.scope.or_else(|| self.p.scope.clone()),
            expires_at,
            event: "authorized",
        };
        let lost = "the new tokens are lost: run 'tokend authorize' again";
        let store = StoreConn::open_config(self.config, true)
            .map_err(|e| Exit::failure(format!("cannot open the database: {e}; {lost}")))?;
        let stored = if self.force {
            super::past_refreshes(self.config, || store.replace(&new)).map(drop)
        } else {
            store.insert(&new).map(drop)
        };
        match stored {
            Ok(()) => Ok(format!(
                "authorized {} (provider {}){}; a running daemon picks it up within seconds",
                self.name,
                self.p.name,
                expires_at
                    .map(|at| format!(", access token valid for {}", span(at - now_ms())))
                    .unwrap_or_default()
            )),
            Err(StoreError::Exists(_)) => Err(Exit::failure(format!(
                "a credential named {:?} was created meanwhile, so nothing was stored and {lost} \
                 with --force to replace it",
                self.name
            ))),
            Err(e) => Err(Exit::failure(format!(
                "cannot store the credential: {e}; {lost}"
            ))),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit::failure(format!("cannot start the async runtime: {e}")))
}

/// Who would open the SSH tunnel: the user behind sudo, if any.
fn login_name() -> String {
    ["SUDO_USER", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "user".into())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this-host".into())
}
