//! Test support: stand-ins for the parties the proxy talks to, all on loopback.
//!
//! - `pki`: a throw-away CA and a server certificate for `localhost`/127.0.0.1.
//! - `tokens`: the book of access tokens the mock identity provider has issued,
//!   shared with the mock upstreams so that they can check XOAUTH2 logins.
//! - `idp`: a mock Microsoft identity platform v2.0 (device code, token endpoint).
//! - `imap_upstream`: a mock TLS IMAP server that accepts only XOAUTH2.
//! - `smtp_upstream`: a mock SMTP submission server with STARTTLS and XOAUTH2.
//! - `proxy`: runs the real `xoauth2-proxy` binary with a generated config.
//! - `world`: all of the above started together, plus a raw line client.
#![allow(dead_code)]

pub mod idp;
pub mod imap_upstream;
pub mod pki;
pub mod proxy;
pub mod smtp_upstream;
pub mod tokens;
pub mod world;
