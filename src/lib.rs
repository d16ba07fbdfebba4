//! tokend keeps OAuth 2.0 access tokens fresh and publishes them, so that the
//! programs that call an API never speak OAuth. See README.md for the tour and
//! the contract (commands, config keys, socket routes, file formats, states),
//! and docs/design.md for the rules of the refresh path.

pub mod alerts;
pub mod authorize;
pub mod callback;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dirsync;
pub mod exit;
pub mod glob;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod provider;
pub mod publish;
pub mod refresher;
pub mod seal;
pub mod secret;
pub mod socket;
pub mod store;
pub mod users;
pub mod watch;
pub mod wire;
