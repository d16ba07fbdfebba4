//! Issue 13: grants beyond the authorization code (README "Other grants"),
//! end to end against the real binary and the fake provider: the
//! client_credentials grant (RFC 6749 §4.4), the device authorization
//! grant (RFC 8628) and revocation (RFC 7009). Like every test of the kit,
//! each is a secrets audit: no token, device code or client secret in argv,
//! logs or CLI stderr.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use support::*;

const PATIENCE: Duration = Duration::from_secs(30);

/// The config of `Env::new` (FAST_REFRESH, one raw sink), with `extra`
/// lines in the fake provider's table.
fn configure(env: &Env, extra: &str) {
    let text = format!(
        "database = \"{}\"\nsocket = \"{}\"\n{FAST_REFRESH}\n{}{extra}\n{}",
        env.db.display(),
        env.socket.display(),
        env.provider_block(),
        env.sink("raw", "0600"),
    );
    std::fs::write(&env.config_path, text).unwrap();
}

fn endpoints(env: &Env) -> String {
    let url = env.provider.url();
    format!(
        "revocation_url = \"{url}/oauth2/revoke\"\n\
         device_authorization_url = \"{url}/oauth2/device_authorization\"\n"
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_status(env: &Env, name: &str) -> serde_json::Value {
    let out = env.cli(&["status", name, "--json"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

// ---- client_credentials ----

/// `tokend remove NAME` and `tokend import NAME` (a new grant) in quick
/// succession, while the daemon is busy with the old row (its validation
/// waits 2 s at the provider): the daemon takes the new grant and publishes
/// its token. Before a new row's revision started at the clock, the new
/// row's revision was below the old one's, the daemon never reloaded it,
/// and it kept serving the removed credential.
#[test]
fn a_name_removed_and_imported_again_reaches_the_daemon() {
    // The old row refreshed once (its version moved past the new row's),
    // or never (both rows at version 1).
    for refreshed in [true, false] {
        let env = Env::new(Knobs::default());
        env.import("bot", !refreshed);
        let d = env.start();
        wait_for(
            "the start-up refresh or validation",
            Duration::from_secs(20),
            || {
                let s = env.provider.stats();
                (s.refreshes_ok + s.validations_ok == 1).then_some(())
            },
        );
        wait_serving(&env.socket, Duration::from_secs(20));
        wait_for("the token in the file", Duration::from_secs(20), || {
            env.read_token("bot")
        });
        env.provider.update_knobs(|k| k.latency_ms = 2000);
        validation_out(&env);
        assert!(env.cli(&["remove", "bot"], "").status.success());
        let g = import_expiring(&env, "bot", 3600);
        env.provider.update_knobs(|k| k.latency_ms = 0);
        wait_for(
            "the new grant's token in the file",
            Duration::from_secs(20),
            || (env.read_token("bot")? == g.access_token).then_some(()),
        );
        assert!(
            get(&env.socket, "/v1/tokens/bot").text() == g.access_token,
            "the socket serves the removed credential's token (refreshed: {refreshed})"
        );
        drop(d);
    }
}

/// The same, with nothing in flight: the removal and the new import both
/// land while the daemon is frozen (SIGSTOP), so it sees one change, a row
/// at version 1 where a row at version 1 was. Its token is a different
/// one, and the file must get it at once, not at its first refresh (an
/// hour away here), even while the provider's validation endpoint fails
/// (a validation that succeeds writes the files anyway). Before
/// `Entry::adopt` told rows apart by their creation too, the socket served
/// the new token and the file kept the removed credential's.
#[test]
fn a_name_replaced_at_the_same_version_is_published_at_once() {
    let env = Env::new(Knobs::default());
    let old = import_expiring(&env, "bot", 3600);
    let d = env.start();
    validated_and_published(&env, &old.access_token);
    // The provider's validation is down: no validation of the new row
    // succeeds, and so none publishes it.
    env.provider.update_knobs(|k| {
        k.fault = Some(Fault::Status503);
        k.fault_on = FaultTarget::Validate;
    });
    d.pause();
    assert!(env.cli(&["remove", "bot"], "").status.success());
    let new = import_expiring(&env, "bot", 3600);
    d.signal(libc::SIGCONT);
    served_and_published(&env, &new.access_token);
    assert_eq!(
        env.provider.stats().token_requests,
        0,
        "the file waited for a refresh"
    );
    drop(d);
}

/// The same with a validation of the old token in flight, which then
/// fails (503): its failure is about the old token, and does not land on
/// the new row (which is at version 1 too). Before results were matched
/// to the row's creation as well as its version, the failure was recorded
/// on the new row, the daemon took that row as the one it had published,
/// and the file kept the removed credential's token while the socket
/// served the new one.
#[test]
fn a_failed_validation_of_a_replaced_token_does_not_land_on_the_new_row() {
    let env = Env::new(Knobs::default());
    let (d, new) = replaced_during_a_validation(&env, Fault::Status503, None);
    served_and_published(&env, &new.access_token);
    drop(d);
}

/// The same with the validation of the old token in flight refused (401),
/// which asks for a refresh: a refresh decided on the removed grant's
/// token does not spend the new grant's refresh token (at version 1 too).
/// Before the lease was matched to the row's creation as well as its
/// version, the daemon refreshed the new grant it had never looked at.
#[test]
fn a_refused_token_of_a_replaced_grant_does_not_refresh_the_new_one() {
    let env = Env::new(Knobs::default());
    let refused = Fault::OauthError {
        status: 401,
        error: "invalid_token".into(),
    };
    let (d, new) = replaced_during_a_validation(&env, refused, Some(1));
    env.provider.update_knobs(|k| k.latency_ms = 0);
    // The refresh the 401 asked for meets the new row and takes it.
    d.wait_log(
        "already refreshed by another process",
        Duration::from_secs(20),
    );
    assert_eq!(
        env.provider.stats().token_requests,
        0,
        "the new grant was refreshed"
    );
    served_and_published(&env, &new.access_token);
    drop(d);
}

/// `bot` imported, validated and published; then a validation of its
/// token held 3 s by the provider and answered with `fault` (`count`
/// times, or until cleared), while `bot` is removed and imported anew.
/// Returns the daemon and the new grant.
fn replaced_during_a_validation(
    env: &Env,
    fault: Fault,
    count: Option<u64>,
) -> (Daemon, MintedGrant) {
    env.write_config(&fast_refresh_timeout("15s"), &env.sink("raw", "0600"));
    let old = import_expiring(env, "bot", 3600);
    let d = env.start();
    validated_and_published(env, &old.access_token);
    env.provider.update_knobs(|k| {
        k.latency_ms = 3000;
        k.fault = Some(fault);
        k.fault_on = FaultTarget::Validate;
        k.fault_count = count;
    });
    validation_out(env);
    // Held still while the name is replaced, so that the answer comes
    // after the replacement however long the commands take (it waits in
    // the socket buffer if the provider's 3 s have passed).
    d.pause();
    assert!(env.cli(&["remove", "bot"], "").status.success());
    let new = import_expiring(env, "bot", 3600);
    d.signal(libc::SIGCONT);
    (d, new)
}

/// Reports `bot`'s token refused, and waits for the validation this asks
/// for to reach the provider (where it waits out the provider's latency).
fn validation_out(env: &Env) {
    let validations = env.provider.stats().validations;
    assert_eq!(
        request(&env.socket, "POST", "/v1/tokens/bot/rejected").status,
        202
    );
    wait_for(
        "the validation at the provider",
        Duration::from_secs(10),
        || (env.provider.stats().validations > validations).then_some(()),
    );
}

/// Waits for `bot`'s start-up validation to be recorded (not only
/// answered: a daemon frozen in that write would hold the store's lock,
/// and `remove` wait for it) and for `token` in its file.
fn validated_and_published(env: &Env, token: &str) {
    wait_for("the start-up validation", Duration::from_secs(20), || {
        env.credential("bot")?.last_validated_at.map(drop)
    });
    wait_for("the token in the file", Duration::from_secs(20), || {
        (env.read_token("bot")? == token).then_some(())
    });
}

/// Waits for the socket, then the file, to give `bot`'s new `token`.
fn served_and_published(env: &Env, token: &str) {
    wait_for(
        "the socket serving the new grant's token",
        Duration::from_secs(20),
        || (get(&env.socket, "/v1/tokens/bot").text() == token).then_some(()),
    );
    wait_for(
        "the new grant's token in the file",
        Duration::from_secs(20),
        || (env.read_token("bot")? == token).then_some(()),
    );
}

#[test]
fn client_credentials_import_publishes_and_refreshes_before_expiry() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 6,
        ..Knobs::default()
    });
    configure(&env, "scope = \"machine\"\n");
    // A refresh token makes no sense with it: refused, nothing stored.
    let out = env.cli(
        &[
            "import",
            "machine",
            "--provider",
            "fake",
            "--client-credentials",
            "--refresh-token",
            "-",
        ],
        "frt_x",
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--refresh-token") && stderr(&out).contains("--client-credentials"),
        "{}",
        stderr(&out)
    );
    assert!(env.credential("machine").is_none());

    let out = env.cli(
        &[
            "import",
            "machine",
            "--provider",
            "fake",
            "--client-credentials",
        ],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let row = env.row("machine").unwrap();
    assert_eq!(
        (
            row.grant.as_str(),
            row.access_token,
            row.refresh_token.as_str()
        ),
        ("client_credentials", None, "")
    );

    let _daemon = env.start();
    // No access token yet: the daemon fetches one at once.
    let first = wait_for("the first token", PATIENCE, || env.read_token("machine"));
    assert!(env.provider.access_token_valid(&first));
    let sent = env.provider.requests();
    let fetch = sent
        .iter()
        .find(|r| r.endpoint == "token")
        .expect("a token request");
    assert_eq!(fetch.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(
        fetch.form_fields,
        ["grant_type", "client_id", "client_secret", "scope"]
    );
    assert_eq!(fetch.client_auth.as_deref(), Some("client_secret_post"));
    assert_eq!(fetch.scope_raw.as_deref(), Some("machine"));
    assert_eq!(json_status(&env, "machine")["grant"], "client_credentials");

    // The next one comes before the first expires (6 s; 2 s ahead).
    let second = wait_for("a second token", PATIENCE, || {
        env.read_token("machine").filter(|t| *t != first)
    });
    assert!(
        env.provider.access_token_valid(&first),
        "the first token expired before the second came"
    );
    assert!(env.provider.access_token_valid(&second));
    let stats = env.provider.stats();
    assert_eq!(stats.client_credentials_ok, 2, "{stats:?}");
    assert_eq!(stats.refresh_requests, 0);
    assert_eq!(env.state("machine").as_deref(), Some("valid"));
}

#[test]
fn client_credentials_back_off_on_5xx_and_stop_on_unauthorized_client() {
    let env = Env::bare(Knobs {
        token_lifetime_secs: 4,
        fault: Some(Fault::Status503),
        fault_on: FaultTarget::Token,
        fault_count: Some(2),
        ..Knobs::default()
    });
    configure(&env, "");
    let out = env.cli(
        &["import", "m", "--provider", "fake", "--client-credentials"],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let _daemon = env.start();
    // Two 503s, each retried after the backoff, then a token.
    let token = wait_for("a token after two 503s", PATIENCE, || env.read_token("m"));
    assert!(env.provider.access_token_valid(&token));
    let stats = env.provider.stats();
    assert_eq!(
        (stats.faults_injected, stats.client_credentials_ok),
        (2, 1),
        "{stats:?}"
    );
    let polls: Vec<u64> = env
        .provider
        .requests()
        .iter()
        .filter(|r| r.endpoint == "token")
        .map(|r| r.at_ms)
        .collect();
    assert!(
        polls.windows(2).all(|w| w[1] > w[0]),
        "one request at a time: {polls:?}"
    );
    assert_eq!(env.state("m").as_deref(), Some("valid"));

    // The client loses the grant at the provider: misconfigured, not a
    // dead grant (there is none to re-authorize).
    env.provider
        .update_knobs(|k| k.client_credentials_clients.clear());
    let row = wait_for("misconfigured", PATIENCE, || {
        env.row("m").filter(|r| r.state == "misconfigured")
    });
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("unauthorized_client")),
        "{row:?}"
    );
    let status = json_status(&env, "m");
    assert_eq!(
        (status["state"].as_str(), status["grant"].as_str()),
        (Some("misconfigured"), Some("client_credentials"))
    );
}

// ---- the device authorization grant ----

/// `tokend authorize NAME --provider fake --device`, running.
fn authorize_device(env: &Env, name: &str) -> Child {
    env.tokend(&["authorize", name, "--provider", "fake", "--device"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the command's end; its stderr is audited.
fn finish(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert_no_secrets(&stderr(&out), "authorize --device stderr");
    out
}

/// The user's decision, over the fake provider's admin route.
fn decide(env: &Env, user_code: &str, approve: bool) {
    let body = format!(r#"{{"user_code":"{user_code}"}}"#);
    let path = if approve { "approve" } else { "deny" };
    let mut s = TcpStream::connect(env.provider.url().trim_start_matches("http://")).unwrap();
    write!(
        s,
        "POST /_admin/device/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

fn pending_user_code(env: &Env) -> String {
    wait_for("a device authorization", PATIENCE, || {
        env.provider.pending_user_codes().pop()
    })
}

fn device_env(knobs: Knobs) -> Env {
    let env = Env::bare(Knobs {
        device_interval_secs: 1,
        ..knobs
    });
    configure(&env, &endpoints(&env));
    env
}

#[test]
fn device_flow_stores_the_credential_once_approved() {
    let env = device_env(Knobs::default());
    let child = authorize_device(&env, "tv");
    let user_code = pending_user_code(&env);
    decide(&env, &user_code, true);
    let out = finish(child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", stderr(&out));
    assert!(stdout.contains(&user_code), "{stdout}");
    assert!(
        stdout.contains(&format!("{}/device", env.provider.url())),
        "{stdout}"
    );
    assert!(stdout.contains("authorized tv"), "{stdout}");
    // The stored refresh token is the grant's: the daemon can keep it fresh.
    let row = env.row("tv").unwrap();
    assert_eq!(row.grant, "refresh_token");
    let grant = env
        .provider
        .grant_of_refresh_token(&row.refresh_token)
        .unwrap();
    assert!(grant.alive);
    // The wire forms of RFC 8628 §3.1 and §3.4.
    let sent = env.provider.requests();
    let start = sent
        .iter()
        .find(|r| r.endpoint == "device_authorization")
        .unwrap();
    assert_eq!(start.form_fields, ["client_id", "client_secret"]);
    let poll = sent.iter().find(|r| r.endpoint == "token").unwrap();
    assert_eq!(
        poll.grant_type.as_deref(),
        Some("urn:ietf:params:oauth:grant-type:device_code")
    );
    assert_eq!(
        poll.form_fields,
        ["grant_type", "client_id", "client_secret", "device_code"]
    );
}

#[test]
fn device_flow_slows_down_for_the_rest_of_the_flow() {
    // The first poll is told to slow down: the next must come at least
    // interval + 5 s = 6 s later. The fake provider's interval grows too,
    // so a client that did not obey would be told again, and polls more.
    let env = device_env(Knobs {
        device_slow_down: 1,
        // A client that did not obey fails within this, rather than hangs.
        device_code_lifetime_secs: 20,
        ..Knobs::default()
    });
    let child = authorize_device(&env, "tv");
    let user_code = pending_user_code(&env);
    decide(&env, &user_code, true);
    let out = finish(child);
    assert!(out.status.success(), "{}", stderr(&out));
    let sent = env.provider.requests();
    let start = sent
        .iter()
        .find(|r| r.endpoint == "device_authorization")
        .unwrap()
        .at_ms;
    let polls: Vec<(u64, u16)> = sent
        .iter()
        .filter(|r| r.endpoint == "token")
        .map(|r| (r.at_ms, r.status))
        .collect();
    assert_eq!(polls.len(), 2, "one slow_down, then the tokens: {polls:?}");
    assert_eq!((polls[0].1, polls[1].1), (400, 200), "{polls:?}");
    // Margins are generous downwards only: sooner is the bug.
    assert!(polls[0].0 - start >= 900, "the interval (1 s): {polls:?}");
    assert!(
        polls[1].0 - polls[0].0 >= 5_900,
        "interval + 5 s after slow_down: {polls:?}"
    );
}

#[test]
fn device_flow_denied_or_expired_stores_nothing() {
    let env = device_env(Knobs {
        device_code_lifetime_secs: 3,
        ..Knobs::default()
    });
    let child = authorize_device(&env, "tv");
    let user_code = pending_user_code(&env);
    decide(&env, &user_code, false);
    let out = finish(child);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing was stored") && stderr(&out).contains("denied"),
        "{}",
        stderr(&out)
    );
    assert!(env.credential("tv").is_none());

    // Nobody decides: the code expires.
    let out = finish(authorize_device(&env, "tv"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing was stored") && stderr(&out).contains("expired"),
        "{}",
        stderr(&out)
    );
    assert!(env.credential("tv").is_none());
}

#[test]
fn device_flow_needs_the_device_authorization_url() {
    let env = Env::new(Knobs::default());
    let out = env.cli(&["authorize", "tv", "--provider", "fake", "--device"], "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("providers.fake.device_authorization_url is not set"),
        "{}",
        stderr(&out)
    );
    // The other ways to give a code do not mix with it.
    let out = env.cli(
        &[
            "authorize",
            "tv",
            "--provider",
            "fake",
            "--device",
            "--paste",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(env.provider.stats().device_codes_issued, 0);
}

// ---- revocation ----

#[test]
fn remove_revoke_kills_the_grant_at_the_provider() {
    let env = Env::bare(Knobs::default());
    configure(&env, &endpoints(&env));
    let g = import_expiring(&env, "bot", 3600);
    let daemon = env.start();
    wait_for("the token file", PATIENCE, || env.read_token("bot"));
    wait_serving(&env.socket, PATIENCE);

    let out = env.cli(&["remove", "bot", "--revoke"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("revoked the grant"), "{stdout}");
    let info = env.provider.grant(g.grant_id).unwrap();
    assert!(!info.alive, "the grant lives on");
    assert!(env.credential("bot").is_none());
    assert!(env.read_token("bot").is_none());
    let revoke = env
        .provider
        .requests()
        .into_iter()
        .find(|r| r.endpoint == "revoke")
        .unwrap();
    assert_eq!(revoke.status, 200);
    assert_eq!(
        revoke.form_fields,
        ["token", "client_id", "client_secret", "token_type_hint"]
    );
    // The running daemon forgets it.
    wait_for("the daemon to forget bot", PATIENCE, || {
        (!listed_names(&env.socket).contains(&"bot".to_owned())).then_some(())
    });
    // The provider refuses the revoked refresh token from now on.
    let out = env.cli(
        &[
            "import",
            "again",
            "--provider",
            "fake",
            "--refresh-token",
            "-",
        ],
        &g.refresh_token,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let row = wait_for("the dead grant to be seen", PATIENCE, || {
        env.row("again")
            .filter(|r| r.state == "needs_reauthorization")
    });
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("invalid_grant")),
        "{row:?}"
    );
    drop(daemon);
}

#[test]
fn remove_revoke_without_revocation_url_keeps_the_credential() {
    let env = Env::new(Knobs::default());
    let g = env.import("bot", true);
    let out = env.cli(&["remove", "bot", "--revoke"], "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("providers.fake.revocation_url is not set")
            && e.contains("stays alive at the provider")
            && e.contains("'tokend remove bot' without --revoke"),
        "{e}"
    );
    assert!(env.credential("bot").is_some());
    assert!(env.provider.grant(g.grant_id).unwrap().alive);
}

/// A Retry-After longer than `remove --revoke` waits between attempts is
/// not cut short: one request, and the user is told when to try again.
/// Before, it was cut to 10 s, and two more requests went out.
#[test]
fn remove_revoke_keeps_a_long_retry_after() {
    let env = Env::bare(Knobs {
        fault: Some(Fault::TooManyRequests {
            retry_after_secs: Some(60),
        }),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    configure(&env, &endpoints(&env));
    env.import("bot", true);
    let out = env.cli(&["remove", "bot", "--revoke"], "");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("The credential is kept: try again in 1m"), "{e}");
    assert_eq!(env.provider.stats().faults_injected, 1);
    assert!(env.credential("bot").is_some());
}

#[test]
fn remove_revoke_failure_keeps_the_credential() {
    let env = Env::bare(Knobs {
        fault: Some(Fault::Status503),
        fault_on: FaultTarget::Token,
        ..Knobs::default()
    });
    configure(&env, &endpoints(&env));
    let g = env.import("bot", true);
    // 503 on every attempt: retried (RFC 7009 §2.2.1), then given up.
    let out = env.cli(&["remove", "bot", "--revoke"], "");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("The credential is kept"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.provider.stats().faults_injected, 3);
    // A provider that revokes no refresh tokens says so.
    env.provider.update_knobs(|k| {
        k.fault = None;
        k.revocation_unsupported = true;
    });
    let out = env.cli(&["remove", "bot", "--revoke"], "");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unsupported_token_type"),
        "{}",
        stderr(&out)
    );
    let row = env.row("bot").unwrap();
    assert_eq!(row.state, "valid", "kept as it was");
    assert!(env.provider.grant(g.grant_id).unwrap().alive);
    // The lease was given back: the operator can retry.
    env.provider
        .update_knobs(|k| k.revocation_unsupported = false);
    let out = env.cli(&["remove", "bot", "--revoke"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!env.provider.grant(g.grant_id).unwrap().alive);
}
