//! README "Commands" (`authorize`) and "Using it with PandaDoc": onboarding through the browser step, played
//! by curl against the fake provider's authorize endpoint; every way it can
//! fail stores nothing; the PandaDoc preset's requests match the OpenAPI
//! description.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use support::*;
use tokend_fake_provider::RequestRecord;

/// How long a command may take to print its URL or to finish.
const PATIENCE: Duration = Duration::from_secs(20);

/// A port nobody listens on right now. Another test may take it before we
/// do: [`listening`] then tries another.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redirect(port: u16) -> String {
    format!("http://127.0.0.1:{port}/callback")
}

/// The harness's provider "fake" with a redirect_uri and `extra` keys.
fn fake_provider(env: &Env, redirect_uri: &str, extra: &str) -> String {
    format!(
        "{}redirect_uri = \"{redirect_uri}\"\n{extra}",
        env.provider_block()
    )
}

/// Provider "pd": the PandaDoc preset, its URLs pointed at the fake provider.
fn pandadoc_provider(env: &Env, redirect_uri: &str) -> String {
    let url = env.provider.url();
    format!(
        "[providers.pd]\npreset = \"pandadoc\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\
         authorize_url = \"{url}/oauth2/authorize\"\ntoken_url = \"{url}/oauth2/access_token\"\n\
         validate_url = \"{url}/public/v1/members/current\"\nredirect_uri = \"{redirect_uri}\"\n",
        env.provider.client_id(),
        env.secret_file.display()
    )
}

/// A config with FAST_REFRESH, a raw sink and `providers`. The socket is
/// the test's own: with the default, daemons of tests running at the same
/// time (or a real tokend) would share /run/tokend/tokend.sock, and all but
/// the first would refuse to start.
fn configure(env: &Env, providers: &str) {
    let text = format!(
        "database = \"{}\"\nsocket = \"{}\"\n{FAST_REFRESH}\n{providers}\n{}",
        env.db.display(),
        env.socket.display(),
        env.sink("raw", "0600")
    );
    std::fs::write(&env.config_path, text).unwrap();
}

/// A `tokend authorize` process, its output collected as it comes.
struct Run {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// How a run ended.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn spawn(env: &Env, args: &[&str]) -> Run {
        let mut child = env
            .tokend(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |pipe: Box<dyn Read + Send>, into: Arc<Mutex<String>>| {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut text = into.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            })
        };
        let (stdout, stderr) = Default::default();
        let readers = vec![
            collect(Box::new(child.stdout.take().unwrap()), Arc::clone(&stdout)),
            collect(Box::new(child.stderr.take().unwrap()), Arc::clone(&stderr)),
        ];
        Run {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// The authorization URL, once printed.
    fn printed_url(&self) -> Option<String> {
        let out = self.stdout.lock().unwrap();
        out.lines()
            .find(|l| l.starts_with("http") && l.contains("/oauth2/authorize?"))
            .map(str::to_owned)
    }

    fn url(&mut self) -> String {
        wait_for("the authorization URL", PATIENCE, || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "authorize exited ({status}) before printing a URL: {}",
                    self.stderr.lock().unwrap()
                );
            }
            self.printed_url()
        })
    }

    /// Writes to the command's stdin and closes it.
    fn feed(&mut self, text: &str) {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }

    /// Others see argv in `ps`: it must never hold a secret.
    fn assert_argv_clean(&self) {
        let argv = std::fs::read(format!("/proc/{}/cmdline", self.child.id())).unwrap();
        let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
        assert!(argv.contains("authorize"), "not our process: {argv}");
        assert_no_secrets(&argv, "authorize's argv");
    }

    /// Waits for the exit; the output is checked for secrets.
    fn finish(mut self) -> Outcome {
        let status = wait_for("authorize to exit", PATIENCE, || {
            self.child.try_wait().unwrap()
        });
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        assert_no_secrets(&stdout, "authorize's stdout");
        assert_no_secrets(&stderr, "authorize's stderr");
        Outcome {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tokend args` listening on a fresh port for the provider block
/// `providers(redirect_uri)`; returns the run, its URL and the port.
fn listening(env: &Env, providers: impl Fn(&str) -> String, args: &[&str]) -> (Run, String, u16) {
    for _ in 0..10 {
        let port = free_port();
        configure(env, &providers(&redirect(port)));
        let mut run = Run::spawn(env, args);
        let printed = wait_for("a URL or an exit", PATIENCE, || {
            if let Some(url) = run.printed_url() {
                return Some(Some(url));
            }
            run.child.try_wait().unwrap().map(|_| None)
        });
        match printed {
            Some(url) => return (run, url, port),
            None => {
                let out = run.finish();
                assert!(
                    out.stderr.contains("is in use"),
                    "authorize failed: {}",
                    out.stderr
                );
            }
        }
    }
    panic!("no free port in ten tries");
}

/// Runs a command to completion with `stdin`; its output is checked for secrets.
fn cli(env: &Env, args: &[&str], stdin: &str) -> Outcome {
    let mut run = Run::spawn(env, args);
    run.feed(stdin);
    run.finish()
}

/// The browser: follows the provider's redirect to our listener; returns
/// the page it ends on.
fn browse(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-L", "--max-time", "20", url])
        .output()
        .expect("curl is needed for these tests (apt-get install curl)");
    let page = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_no_secrets(&page, "the page the browser shows");
    page
}

/// Where the provider sends the browser after consent, without going there:
/// what a user copies from the address bar.
fn redirect_location(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{redirect_url}", url])
        .output()
        .expect("curl is needed for these tests (apt-get install curl)");
    let location = String::from_utf8(out.stdout).unwrap();
    assert!(location.contains("code="), "no code in {location:?}");
    location
}

/// A fresh code from the provider for `redirect_uri`, as if by hand.
fn code_by_hand(env: &Env, redirect_uri: &str) -> String {
    let url = format!(
        "{}/oauth2/authorize?client_id={}&redirect_uri={}&response_type=code",
        env.provider.url(),
        env.provider.client_id(),
        redirect_uri.replace(':', "%3A").replace('/', "%2F")
    );
    let location = redirect_location(&url);
    let code = location.split("code=").nth(1).unwrap();
    code.split('&').next().unwrap().to_owned()
}

/// Some when the token file holds the stored token of a valid credential.
fn published(env: &Env, name: &str) -> Option<()> {
    let row = env.row(name)?;
    let token = env.read_token(name)?;
    (row.state == "valid" && Some(token) == row.access_token).then_some(())
}

/// The provider's records of one endpoint.
fn records(env: &Env, endpoint: &str) -> Vec<RequestRecord> {
    env.provider
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == endpoint)
        .collect()
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_browser_flow_stores_a_credential_that_the_running_daemon_publishes_and_refreshes() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        ..Knobs::default()
    });
    configure(&env, &fake_provider(&env, &redirect(free_port()), ""));
    let d = env.start();
    d.wait_log("tokend running", PATIENCE);

    let (run, url, port) = listening(
        &env,
        |r| fake_provider(&env, r, ""),
        &["authorize", "bot", "--provider", "fake"],
    );
    run.assert_argv_clean();
    let redirect_param = format!("redirect_uri=http%3A%2F%2F127.0.0.1%3A{port}%2Fcallback");
    assert!(url.contains(&redirect_param), "{url}");
    assert!(url.contains("&response_type=code&state="), "{url}");
    {
        let out = run.stdout.lock().unwrap();
        assert!(
            out.contains(&format!("ssh -N -L {port}:127.0.0.1:{port} ")),
            "{out}"
        );
        assert!(out.contains("--paste"), "{out}");
    }

    let page = browse(&url);
    assert!(page.contains("authorized bot (provider fake)"), "{page}");
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("authorized bot (provider fake)"),
        "{}",
        out.stdout
    );

    let row = env.row("bot").expect("stored");
    assert_eq!(row.state, "valid");
    let first = row.access_token.unwrap();
    assert!(env.provider.access_token_valid(&first));
    assert_eq!(env.events("bot", "authorized"), 1);
    // The daemon picks the new row up by itself, publishes it, and
    // refreshes it when it is due (the tokens live 4 s).
    wait_for("the token file", PATIENCE, || published(&env, "bot"));
    wait_for("a refreshed token", PATIENCE, || {
        let now = env.read_token("bot")?;
        (now != first && env.provider.stats().refreshes_ok > 0).then_some(())
    });
    let s = env.provider.stats();
    assert_eq!((s.code_exchanges, s.code_exchanges_ok), (1, 1));
    assert_eq!(s.bad_requests, 0);
    // A generic provider repeats redirect_uri in the exchange (RFC 6749 §4.1.3).
    let exchange = &records(&env, "token")[0];
    assert_eq!(
        exchange.form_fields,
        strings(&[
            "grant_type",
            "client_id",
            "client_secret",
            "code",
            "redirect_uri"
        ])
    );
    assert_eq!(
        records(&env, "authorize")[0].form_fields,
        strings(&["client_id", "redirect_uri", "response_type", "state"])
    );
    drop(d);
}

#[test]
fn pkce_and_authorize_params_reach_the_provider() {
    let env = Env::bare(Knobs::default());
    let extra = "pkce = true\nauthorize_params = { prompt = \"consent\" }\n";
    let (run, url, _) = listening(
        &env,
        |r| fake_provider(&env, r, extra),
        &["authorize", "bot", "--provider", "fake"],
    );
    assert!(
        url.contains("&code_challenge_method=S256&prompt=consent"),
        "{url}"
    );
    browse(&url);
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(env.state("bot").as_deref(), Some("valid"));
    // The provider checked the verifier against the challenge (S256).
    assert!(
        records(&env, "token")[0]
            .form_fields
            .contains(&"code_verifier".to_owned())
    );
    assert_eq!(
        records(&env, "authorize")[0].form_fields,
        strings(&[
            "client_id",
            "redirect_uri",
            "response_type",
            "state",
            "code_challenge",
            "code_challenge_method",
            "prompt"
        ])
    );
}

#[test]
fn a_forged_state_is_refused_and_the_old_row_is_untouched() {
    let env = Env::bare(Knobs::default());
    configure(&env, &fake_provider(&env, &redirect(free_port()), ""));
    env.import("bot", true);
    let before = env.row("bot").unwrap();
    let (run, _url, port) = listening(
        &env,
        |r| fake_provider(&env, r, ""),
        &["authorize", "bot", "--provider", "fake", "--force"],
    );
    let forged = format!("http://127.0.0.1:{port}/callback?code=fcode_forged&state=forged");
    let page = browse(&forged);
    assert!(page.contains("state does not match"), "{page}");
    let out = run.finish();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nothing was stored"), "{}", out.stderr);
    assert!(
        out.stderr.contains("state does not match"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("Run 'tokend authorize' again"),
        "{}",
        out.stderr
    );
    let after = env.row("bot").unwrap();
    assert_eq!(
        (after.version, after.access_token, after.refresh_token),
        (before.version, before.access_token, before.refresh_token)
    );
    assert_eq!(env.provider.stats().code_exchanges, 0);
}

#[test]
fn access_denied_stores_nothing() {
    let env = Env::bare(Knobs {
        deny_authorization: true,
        ..Knobs::default()
    });
    let (run, url, _) = listening(
        &env,
        |r| fake_provider(&env, r, ""),
        &["authorize", "bot", "--provider", "fake"],
    );
    let page = browse(&url);
    assert!(page.contains("access_denied"), "{page}");
    let out = run.finish();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("the provider refused the authorization: access_denied"),
        "{}",
        out.stderr
    );
    assert!(env.row("bot").is_none());
    assert_eq!(env.provider.stats().code_exchanges, 0);
}

#[test]
fn no_browser_within_the_timeout_stores_nothing() {
    let env = Env::bare(Knobs::default());
    let (run, _, _) = listening(
        &env,
        |r| fake_provider(&env, r, ""),
        &["authorize", "bot", "--provider", "fake", "--timeout", "1s"],
    );
    let out = run.finish();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("no answer from the browser within 1s"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
    assert!(env.row("bot").is_none());
}

#[test]
fn a_port_in_use_is_reported_before_the_url() {
    let env = Env::bare(Knobs::default());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    configure(&env, &fake_provider(&env, &redirect(port), ""));
    let out = cli(&env, &["authorize", "bot", "--provider", "fake"], "");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("port {port} is in use")),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--paste"), "{}", out.stderr);
    assert!(!out.stdout.contains("oauth2/authorize"), "{}", out.stdout);
    assert!(env.row("bot").is_none());
    drop(taken);
}

#[test]
fn a_reused_code_is_refused_and_nothing_changes() {
    let env = Env::bare(Knobs::default());
    let redirect_uri = redirect(free_port());
    configure(&env, &fake_provider(&env, &redirect_uri, ""));
    let code = code_by_hand(&env, &redirect_uri);
    // --code - reads the code from stdin.
    let out = cli(
        &env,
        &["authorize", "first", "--provider", "fake", "--code", "-"],
        &format!("{code}\n"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let first = env.row("first").unwrap();
    assert_eq!(first.state, "valid");

    // The same code again, on argv (allowed: it is single-use).
    let out = cli(
        &env,
        &["authorize", "second", "--provider", "fake", "--code", &code],
        "",
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("invalid_grant"), "{}", out.stderr);
    assert!(
        out.stderr.contains("code was already used"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("a code works once"), "{}", out.stderr);
    assert!(env.row("second").is_none());

    // Nor does --force let it replace an existing credential.
    let out = cli(
        &env,
        &[
            "authorize",
            "first",
            "--provider",
            "fake",
            "--force",
            "--code",
            &code,
        ],
        "",
    );
    assert_eq!(out.code, 1);
    let after = env.row("first").unwrap();
    assert_eq!(
        (after.version, after.access_token, after.refresh_token),
        (first.version, first.access_token, first.refresh_token)
    );
}

#[test]
fn paste_reads_the_redirect_address_from_stdin_and_checks_its_state() {
    let env = Env::bare(Knobs::default());
    // A redirect URI nobody listens on: a server-side app's, say.
    let redirect_uri = "https://app.example.com/oauth/callback";
    configure(&env, &fake_provider(&env, redirect_uri, ""));

    let mut run = Run::spawn(&env, &["authorize", "bot", "--provider", "fake", "--paste"]);
    let url = run.url();
    run.assert_argv_clean();
    assert!(
        run.stdout.lock().unwrap().contains("paste it here"),
        "instructions"
    );
    let landed = redirect_location(&url);
    assert!(landed.starts_with(redirect_uri), "{landed}");
    run.feed(&format!("{landed}\n"));
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(env.state("bot").as_deref(), Some("valid"));

    // An address from an older run (a stale tab) carries another state.
    let mut run = Run::spawn(
        &env,
        &["authorize", "other", "--provider", "fake", "--paste"],
    );
    run.url();
    let stale = redirect_location(&url);
    run.feed(&format!("{stale}\n"));
    let out = run.finish();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("state does not match"),
        "{}",
        out.stderr
    );
    assert!(env.row("other").is_none());
    assert_eq!(env.provider.stats().code_exchanges, 1);
}

#[test]
fn code_from_stdin_is_never_in_argv() {
    let env = Env::bare(Knobs::default());
    let redirect_uri = redirect(free_port());
    configure(&env, &fake_provider(&env, &redirect_uri, ""));
    let code = code_by_hand(&env, &redirect_uri);
    let mut run = Run::spawn(
        &env,
        &["authorize", "bot", "--provider", "fake", "--code", "-"],
    );
    // While it waits for stdin.
    wait_for("authorize to start", PATIENCE, || {
        let argv = std::fs::read(format!("/proc/{}/cmdline", run.child.id())).ok()?;
        String::from_utf8_lossy(&argv)
            .contains("authorize")
            .then_some(())
    });
    run.assert_argv_clean();
    run.feed(&code);
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(env.state("bot").as_deref(), Some("valid"));
}

#[test]
fn usage_and_config_errors_say_what_to_do() {
    let env = Env::bare(Knobs::default());
    configure(
        &env,
        &format!(
            "{}\n[providers.remote]\nclient_id = \"c\"\nclient_secret_file = \"{}\"\n\
             authorize_url = \"https://id.example/a\"\ntoken_url = \"https://id.example/t\"\n\
             validate_url = \"https://id.example/v\"\nredirect_uri = \"https://app.example/cb\"\n",
            env.provider_block(),
            env.secret_file.display()
        ),
    );
    let run = |args: &[&str]| cli(&env, args, "");

    let out = run(&["authorize", "bot", "--provider", "nope"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("no provider \"nope\"") && out.stderr.contains("fake, remote"),
        "{}",
        out.stderr
    );
    let out = run(&["authorize", "bot", "--provider", "fake"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("providers.fake.redirect_uri is not set"),
        "{}",
        out.stderr
    );
    let out = run(&["authorize", "bot", "--provider", "remote"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("not a loopback http address")
            && out.stderr.contains("http://127.0.0.1:8765/callback")
            && out.stderr.contains("--paste"),
        "{}",
        out.stderr
    );
    let out = run(&[
        "authorize",
        "bot",
        "--provider",
        "fake",
        "--paste",
        "--code",
        "x",
    ]);
    assert_eq!(out.code, 2);
    let out = run(&[
        "authorize",
        "bot",
        "--provider",
        "fake",
        "--timeout",
        "soon",
    ]);
    assert_eq!(out.code, 2);
    let out = run(&["authorize", "--provider", "fake"]);
    assert_eq!(out.code, 2);

    env.import("bot", false);
    let out = run(&["authorize", "bot", "--provider", "remote", "--paste"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    assert!(env.provider.requests().is_empty());
}

#[test]
fn reauthorizing_brings_a_dead_credential_back_while_the_daemon_runs() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        fault: Some(Fault::InvalidGrant),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    configure(&env, &fake_provider(&env, &redirect(free_port()), ""));
    env.import("bot", true);
    let d = env.start();
    wait_for("needs_reauthorization", PATIENCE, || {
        (env.state("bot").as_deref() == Some("needs_reauthorization")).then_some(())
    });
    wait_for("the files to go", PATIENCE, || {
        (!env.token_file("bot").exists()).then_some(())
    });
    env.provider.update_knobs(|k| k.fault = None);

    let (run, url, _) = listening(
        &env,
        |r| fake_provider(&env, r, ""),
        &["authorize", "bot", "--provider", "fake", "--force"],
    );
    browse(&url);
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("bot exists (needs_reauthorization)"));
    // Published again without a restart, and refreshed from then on.
    wait_for("the new token file", PATIENCE, || published(&env, "bot"));
    let refreshed = env.provider.stats().refreshes_ok;
    wait_for("a refresh of the new grant", PATIENCE, || {
        (env.provider.stats().refreshes_ok > refreshed).then_some(())
    });
    drop(d);
}

#[test]
fn pandadoc_requests_match_the_openapi_description() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        ..Knobs::default()
    });
    let (run, url, port) = listening(
        &env,
        |r| pandadoc_provider(&env, r),
        &["authorize", "bot", "--provider", "pd"],
    );
    // README "Using it with PandaDoc"'s shape, state added.
    let expected = format!(
        "{}/oauth2/authorize?client_id={}&redirect_uri=http%3A%2F%2F127.0.0.1%3A{port}%2Fcallback\
         &scope=read+write&response_type=code&state=",
        env.provider.url(),
        env.provider.client_id()
    );
    assert!(url.starts_with(&expected), "{url}");
    browse(&url);
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut d = env.start();
    wait_for("a refresh", PATIENCE, || {
        (env.provider.stats().refreshes_ok > 0).then_some(())
    });
    assert!(d.stop().success());

    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/pandadoc-openapi-excerpt.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let body = &spec["paths"]["/oauth2/access_token"]["post"]["requestBody"]["content"];
    let schema = |grant: &str| {
        let name = match grant {
            "authorization_code" => "OAuth2CreateAccessTokenRequest",
            "refresh_token" => "OAuth2RefreshAccessTokenRequest",
            other => panic!("unexpected grant_type {other}"),
        };
        let reference = format!("#/components/schemas/{name}");
        let one_of = body["application/x-www-form-urlencoded"]["schema"]["oneOf"]
            .as_array()
            .unwrap();
        assert!(one_of.iter().any(|s| s["$ref"] == reference.as_str()));
        &spec["components"]["schemas"][name]
    };
    let tokens = records(&env, "token");
    let grants: BTreeSet<_> = tokens.iter().filter_map(|r| r.grant_type.clone()).collect();
    assert_eq!(
        grants,
        BTreeSet::from(["authorization_code".to_owned(), "refresh_token".to_owned()])
    );
    for r in &tokens {
        let s = schema(r.grant_type.as_deref().unwrap());
        let media = r.content_type.as_deref().unwrap_or_default();
        assert!(
            body.get(media.split(';').next().unwrap().trim()).is_some(),
            "content type {media:?} is not in the spec"
        );
        assert_eq!(r.client_auth.as_deref(), Some("client_secret_post"));
        let properties = s["properties"].as_object().unwrap();
        let fields: BTreeSet<&str> = r.form_fields.iter().map(String::as_str).collect();
        assert_eq!(fields.len(), r.form_fields.len(), "repeated fields: {r:?}");
        for f in &fields {
            assert!(
                properties.contains_key(*f),
                "{f} is not in the schema: {r:?}"
            );
        }
        for req in s["required"].as_array().unwrap() {
            assert!(
                fields.contains(req.as_str().unwrap()),
                "{req} missing: {r:?}"
            );
        }
        assert_eq!(r.status, 200, "{r:?}");
        // PandaDoc's one scope is named `read+write`; form encoding writes
        // the name's '+' as %2B, as PandaDoc's own SDK sends it. Refreshes
        // carry it too, as PandaDoc's OpenAPI example does.
        assert_eq!(r.scope_raw.as_deref(), Some("read%2Bwrite"), "{r:?}");
    }
    // In the authorization URL it is `scope=read+write`, as PandaDoc documents.
    assert_eq!(
        records(&env, "authorize")[0].scope_raw.as_deref(),
        Some("read+write")
    );
    assert_eq!(env.provider.stats().bad_requests, 0);
}

#[test]
fn a_standard_openid_provider_is_onboarded_and_refreshed_without_scope_on_refresh() {
    // A refresh token of a standard OpenID provider is not granted
    // offline_access, and asking for it on refresh is refused (invalid_scope).
    let env = Env::bare(Knobs {
        oidc_scopes: true,
        ..Knobs::default()
    });
    let oidc = |r: &str| fake_provider(&env, r, "scope = \"openid offline_access\"\n");
    let (run, url, _) = listening(&env, oidc, &["authorize", "bot", "--provider", "fake"]);
    assert!(url.contains("&scope=openid+offline_access&"), "{url}");
    browse(&url);
    let out = run.finish();
    assert_eq!(out.code, 0, "{}", out.stderr);
    // No daemon: `tokend refresh` refreshes directly, twice (two rotations).
    for _ in 0..2 {
        let out = cli(&env, &["refresh", "bot"], "");
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    assert_eq!(env.state("bot").as_deref(), Some("valid"));
    let s = env.provider.stats();
    assert_eq!((s.refreshes_ok, s.scope_refused), (2, 0), "{s:?}");
    for r in records(&env, "token")
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
    {
        assert!(!r.form_fields.contains(&"scope".to_owned()), "{r:?}");
    }
    // An operator who asks for scope on refresh gets what the provider says.
    let port = free_port();
    configure(
        &env,
        &fake_provider(
            &env,
            &redirect(port),
            "scope = \"openid offline_access\"\nrefresh_scope = true\n",
        ),
    );
    let out = cli(&env, &["refresh", "bot"], "");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("invalid_scope"), "{}", out.stderr);
    let refused = records(&env, "token").pop().unwrap();
    assert_eq!(
        refused.scope_raw.as_deref(),
        Some("openid+offline_access"),
        "{refused:?}"
    );
    assert_eq!(env.provider.stats().scope_refused, 1);
}

/// README "Other grants": PandaDoc has no client_credentials grant for its
/// API users, and tokend sends it none. `import --client-credentials` for
/// a PandaDoc provider was stored, and the daemon then sent PandaDoc that
/// grant.
#[test]
fn a_pandadoc_provider_takes_no_client_credentials_import() {
    let env = Env::bare(Knobs::default());
    configure(
        &env,
        &pandadoc_provider(&env, "http://127.0.0.1:8765/callback"),
    );
    let out = cli(
        &env,
        &["import", "cc", "--provider", "pd", "--client-credentials"],
        "",
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("PandaDoc has no client_credentials grant")
            && out.stderr.contains("tokend authorize cc --provider pd"),
        "{}",
        out.stderr
    );
    assert!(env.store().is_none_or(|s| s.get("cc").unwrap().is_none()));
}
