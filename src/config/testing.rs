//! What config's unit tests share: an environment they give, and parsing
//! that panics or lists problems as text.

use std::collections::HashMap;
use std::path::Path;

use super::{Config, Env, parse};

pub(super) struct FakeEnv(pub(super) HashMap<&'static str, String>);
impl Env for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

pub(super) fn env() -> FakeEnv {
    FakeEnv(HashMap::from([("PD_SECRET", "s3cret".to_owned())]))
}

pub(super) fn parse_ok(text: &str) -> Config {
    parse(text, Path::new("t.toml"), &env()).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn problems(text: &str) -> Vec<String> {
    match parse(text, Path::new("t.toml"), &env()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

pub(super) const PANDADOC: &str = r#"
    database = "/tmp/x/tokend.db"
    [providers.pandadoc]
    preset = "pandadoc"
    client_id = "cid"
    client_secret_env = "PD_SECRET"
"#;
