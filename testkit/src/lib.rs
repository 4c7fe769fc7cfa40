//! Stand-ins for the parties xoauth2-proxy talks to, all on loopback, for its
//! tests, its examples (the demo, the test identity provider) and its benchmark.
//!
//! - [`pki`]: a throw-away CA and a server certificate for `localhost`/127.0.0.1.
//! - [`tokens`]: the book of access tokens the mock identity provider has issued,
//!   shared with the mock upstreams so that they can check XOAUTH2 logins.
//! - [`idp`]: a mock Microsoft identity platform v2.0 (device code, token endpoint).
//! - [`imap`]: a mock TLS IMAP server shaped like Outlook's, that accepts only XOAUTH2.
//! - [`smtp`]: a mock SMTP submission server with STARTTLS and XOAUTH2.
//! - [`proxy`]: runs the real `xoauth2-proxy` binary with a generated config.
//! - [`metrics`]: one series of the proxy's `/metrics`, by name and labels.
//! - [`postgres`]: a real PostgreSQL server in a temporary directory.
//! - [`partition`]: drops every packet to and from one address and port (root).
//! - [`world`]: all of the above started together, plus a raw line client.
//! - [`node`]: the Node.js mail clients (imapflow, nodemailer) the tests drive,
//!   with their locked dependencies installed on first use.
//!
//! Wire formats the tests and the mocks both speak have one home each:
//! [`xoauth2`] builds a SASL XOAUTH2 initial response (through the proxy's own
//! builder), [`parse_xoauth2`] reads one, [`literal_announced`] (the proxy's
//! own) finds an IMAP literal at the end of a line.

mod dates;
pub mod idp;
pub mod imap;
pub mod metrics;
pub mod node;
pub mod partition;
pub mod pki;
pub mod postgres;
pub mod proxy;
mod sasl;
pub mod smtp;
pub mod tokens;
pub mod world;

pub use sasl::{parse_xoauth2, xoauth2};
/// The proxy's own parser, so that the mocks, the tests and the product agree.
pub use xoauth2_proxy::literal_announced;
