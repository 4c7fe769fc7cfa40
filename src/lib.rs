//! xoauth2-proxy: a local IMAP/SMTP proxy that lets mail clients which only
//! know a username and a password reach Microsoft 365 mailboxes, which demand
//! OAuth 2.0 (SASL XOAUTH2).
//!
//! The data path, as the modules follow it: a listener (`server`) accepts a
//! client; the protocol's pre-login dialogue (`imap`, `smtp`) reads its credentials;
//! `login` checks them against the configured `accounts`, gets an access
//! token from the `oauth` token manager, and opens the mailbox through
//! `upstream`; after that, `relay` pipes IMAP bytes both ways, and SMTP
//! transactions borrow pooled upstream connections (`smtp::pool`).
//!
//! # Layers
//!
//! A file imports only from its own module tree and from layers below its
//! own, never from its layer or above, so no two files import each other in a
//! circle; `.ci/check-layers.py` checks both in CI. From the bottom up:
//!
//! <!-- layers: `.ci/check-layers.py` reads this list; one layer per line -->
//! 1. `error`, `secret`, `lines`, `metrics`, `private_file`, `throttle`, `low_water`, `watched`: leaves that import nothing of the crate (`metrics` owns its label types; `private_file` writes 0600 files atomically; `throttle` counts failed logins per address; `low_water` sets the receive low-water mark inside large literals; `watched` is a stream that tells a watcher of every byte it moves)
//! 2. `sasl`, `tls`, `sealing`: SASL encodings (PLAIN, LOGIN, XOAUTH2); CA files and the rustls client setup; the token key and sealed grant files
//! 3. `config`: the config file, validated
//! 4. `accounts`, `oauth`, `upstream`, `relay`, `local_tls`, `graph`: local passwords; tokens and grants; connections to the mail servers; the post-login pipe; the certificate and handshake towards clients; Microsoft Graph `sendMail`
//! 5. `login`, `shared`, `notify`: the login path; what the sessions of one config share, and the `Protocol` trait; the notifications when an account needs `login` (kept across reloads)
//! 6. `imap`, `smtp`: what the mail listeners speak
//! 7. `check`, `fuzzing`: `xoauth2-proxy check` (and the console's Check); the fuzz targets' and property tests' way in (`fuzz/`)
//! 8. `admin`: the admin listener: `/healthz`, `/metrics` and the web console
//! 9. `server`: the listeners, reload and drain
//!
//! <!-- end of layers -->
//!
//! The binary (`src/main.rs`: the command line, signals, `status`) sits on
//! top and uses only what this file re-exports.

pub(crate) mod accounts;
pub(crate) mod admin;
pub(crate) mod check;
pub(crate) mod config;
pub(crate) mod error;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod graph;
pub(crate) mod imap;
pub(crate) mod lines;
pub(crate) mod local_tls;
pub(crate) mod login;
pub(crate) mod low_water;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod oauth;
pub(crate) mod private_file;
pub(crate) mod relay;
pub(crate) mod sasl;
pub(crate) mod sealing;
pub(crate) mod secret;
pub(crate) mod server;
pub(crate) mod shared;
pub(crate) mod smtp;
pub(crate) mod throttle;
pub(crate) mod tls;
pub(crate) mod upstream;
pub(crate) mod watched;

pub use accounts::{hash_password, is_example_password};
pub use admin::{probe as probe_health, unsaved_grants};
pub use check::run as check_accounts;
pub use lines::literal_announced;
pub use local_tls::{Certificate as TlsCertificate, ca_certificate_pem, current_certificate};
pub use sasl::xoauth2;
pub use sealing::write_key_file;
pub use secret::Secret;

pub use config::{
    Account, Config, Flow, LocalPassword, SendVia, StoreKind, default_config_path,
    exposed_secret_warning, state_dir,
};
pub use oauth::authorize::authorize;
pub use oauth::status::unsealed_warning;
pub use oauth::status::{AccountStatus, account_statuses};
pub use oauth::store::migrate as migrate_grants;
pub use oauth::store::rekey as rekey_grants;
pub use oauth::store::{LoadError, Migrated, Rekeyed, StoredGrant, TokenStore, unix_now};
pub use sealing::TokenKey;
pub use server::{Listeners, run};
