//! The tests' mock Microsoft identity platform (v2.0) as a standalone HTTP server,
//! for the end-to-end suite (tests/e2e/run.py): the proxy logs in against it, and
//! Dovecot's `oauth2` passdb validates the proxy's access tokens at its RFC 7662
//! introspection endpoint (`POST /introspect`). It also serves Microsoft Graph's
//! `sendMail` (`POST /v1.0/users/{mailbox}/sendMail`, for `send_via = "graph"`;
//! its base URL is the `graph_url`), recording what it accepts
//! (`GET /control/graph-messages`).
//!
//! ```text
//! cargo run --example test_idp -- --listen 127.0.0.1:0 \
//!     --client 11111111-2222-3333-4444-555555555555:the-secret \
//!     --token-lifetime 20 --device-user sales@example.test --approve-after-polls 2 \
//!     --app-mailbox notify@example.test
//! ```
//!
//! It prints one line, `listening on http://127.0.0.1:PORT`, and serves until it is
//! killed. Test-only, loopback only: besides the Microsoft endpoints
//! (`/{tenant}/oauth2/v2.0/devicecode`, `/token`, `/authorize`) it has control
//! endpoints under `/control/` that revoke grants and read counters
//! (see testkit/src/idp/).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use testkit::idp::{DeviceOutcome, MockIdp};
use testkit::tokens::TokenBook;

/// A mock Microsoft identity platform v2.0 (device code, refresh token rotation,
/// client credentials, AADSTS errors) with RFC 7662 introspection, on loopback.
#[derive(Parser)]
#[command(name = "test_idp")]
struct Args {
    /// Loopback address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// A registered app: `CLIENT_ID:SECRET` (confidential) or `CLIENT_ID` (public).
    /// Repeatable.
    #[arg(long = "client", value_name = "ID[:SECRET]", required = true)]
    clients: Vec<String>,
    /// Access token lifetime, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime: u64,
    /// The mailbox whose grant a device-code approval creates.
    #[arg(long, default_value = "user@example.com")]
    device_user: String,
    /// Device codes are approved at the poll after this many `authorization_pending`s.
    #[arg(long, default_value_t = 2)]
    approve_after_polls: u32,
    /// The polling interval the device authorization response asks for, in seconds.
    #[arg(long, default_value_t = 1)]
    device_interval: u64,
    /// The mailbox app-only (client credentials) tokens may open; without it,
    /// introspection reports them inactive.
    #[arg(long)]
    app_mailbox: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "test_idp: refusing to listen on {}: loopback only",
            args.listen
        );
        std::process::exit(2);
    }
    let idp = MockIdp::start_on(args.listen, TokenBook::default()).await;
    for client in &args.clients {
        match client.split_once(':') {
            Some((id, secret)) => idp.register_client(id, Some(secret)),
            None => idp.register_client(client, None),
        }
    }
    idp.set_access_token_lifetime(Duration::from_secs(args.token_lifetime));
    idp.set_device_user(&args.device_user);
    idp.set_device_outcome(DeviceOutcome::ApproveAfterPolls(args.approve_after_polls));
    idp.set_device_interval(args.device_interval);
    idp.set_app_mailbox(args.app_mailbox.as_deref());

    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {}", idp.base_url());
    let _ = out.flush();
    drop(out);

    // Serve until killed.
    std::future::pending::<()>().await;
}
