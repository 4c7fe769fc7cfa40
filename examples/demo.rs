//! See xoauth2-proxy work without an Azure tenant: the real proxy between
//! stand-ins for Entra ID and Microsoft 365, all in this process, all on 127.0.0.1.
//!
//! ```text
//! cargo run --example demo
//! cargo run --example demo -- --imap-port 2143 --smtp-port 2587 --admin-port 9025
//! ```
//!
//! It starts the tests' stand-ins (the testkit crate): an identity provider
//! speaking Microsoft identity platform v2.0, a TLS IMAP server and a STARTTLS
//! SMTP server that accept only XOAUTH2 with the tokens that provider issued,
//! and a throw-away CA for their certificates. It writes a proxy config for
//! them, runs the device-code `login` (the stand-in approves it by itself),
//! puts a welcome message in the INBOX, and serves the proxy (the library's
//! `run`, as `xoauth2-proxy serve` does) until Ctrl-C. Mail sent through
//! the proxy to the demo mailbox is delivered to its INBOX. It prints how to
//! point a mail client at it, and `curl` lines to try.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use testkit::idp::{DeviceOutcome, MockIdp};
use testkit::imap::MockImapUpstream;
use testkit::pki;
use testkit::smtp::{MockSmtpUpstream, UpstreamTls};
use testkit::tokens::TokenBook;
use xoauth2_proxy::{Config, Listeners, TokenStore, state_dir};

/// The mailbox a mail client logs in to, through the proxy.
const USER: &str = "sales@demo.test";
/// Its local password (what NocoBase would be given).
const PASSWORD: &str = "demo-password";
/// An app-only account (client credentials): no sign-in, like a notifications sender.
const APP_USER: &str = "notifications@demo.test";
const TENANT: &str = "demo.onmicrosoft.com";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_SECRET: &str = "demo-client-secret";

/// Runs xoauth2-proxy against stand-ins for Entra ID and Microsoft 365 on
/// 127.0.0.1, and prints how to point a mail client at it.
#[derive(Parser)]
#[command(name = "demo")]
struct Args {
    /// The proxy's IMAP port.
    #[arg(long, default_value_t = 1143)]
    imap_port: u16,
    /// The proxy's SMTP port.
    #[arg(long, default_value_t = 1587)]
    smtp_port: u16,
    /// The proxy's admin port (/healthz, /metrics).
    #[arg(long, default_value_t = 8025)]
    admin_port: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The demo keeps its grants in its own temporary folder; a state directory
    // from the caller's environment would win over the config's `state_dir`.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::remove_var("XOAUTH2_PROXY_STATE_DIR") };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The stand-ins, kept alive while the proxy serves.
struct StandIns {
    pki: pki::TestPki,
    idp: MockIdp,
    imap: Arc<MockImapUpstream>,
    smtp: Arc<MockSmtpUpstream>,
}

async fn run(args: Args) -> Result<(), String> {
    let stand_ins = start_stand_ins().await;
    let welcome_uid = stand_ins.imap.add_message(USER, welcome(&args));

    let dir = tempfile::Builder::new()
        .prefix("xoauth2-proxy-demo-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let config_path = dir.path().join("config.toml");
    let secret_path = dir.path().join("client-secret");
    std::fs::write(&secret_path, CLIENT_SECRET).map_err(|e| e.to_string())?;
    let text = config_text(&args, &stand_ins, dir.path(), &secret_path);
    std::fs::write(&config_path, &text).map_err(|e| e.to_string())?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;

    println!(
        "xoauth2-proxy demo: the real proxy between stand-ins for Entra ID and Microsoft 365,\n\
         all on 127.0.0.1 (no Azure tenant, no network).\n"
    );
    println!(
        "  Entra ID stand-in  {}/{TENANT}/oauth2/v2.0  (device code, refresh tokens, client credentials)",
        stand_ins.idp.base_url()
    );
    println!(
        "  IMAP stand-in      localhost:{}  (TLS, XOAUTH2 only, like outlook.office365.com:993)",
        stand_ins.imap.port()
    );
    println!(
        "  SMTP stand-in      localhost:{}  (STARTTLS, XOAUTH2 only, like smtp.office365.com:587)",
        stand_ins.smtp.port()
    );
    println!("  proxy config       {}\n", config_path.display());

    println!("1. Authorise the mailbox, as `xoauth2-proxy login {USER}` does");
    println!("   (the stand-in approves the sign-in by itself after one poll):\n");
    let account = config
        .account(USER)
        .cloned()
        .expect("the demo account is configured");
    let store = TokenStore::new(&state_dir(&config));
    xoauth2_proxy::authorize(&config, &store, &account).await?;

    tokio::spawn(deliver(stand_ins.smtp.clone(), stand_ins.imap.clone()));
    let listeners = Listeners::bind(&config)
        .await
        .map_err(|e| with_port_hint(e, &args))?;
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let no_reloads = tokio::sync::mpsc::channel(1).1;
    let server = tokio::spawn(xoauth2_proxy::run(listeners, config, ctrl_c, no_reloads));
    let ready = wait_until_ready(args.admin_port, &server).await;
    if !ready && !server.is_finished() {
        server.abort();
        return Err("the proxy did not come up within 10 s".into());
    }
    if ready {
        print_instructions(&args, welcome_uid, &config_path);
    }
    // Until Ctrl-C (the proxy drains and returns), or at once if it could not start.
    let outcome = server
        .await
        .map_err(|e| format!("the proxy stopped: {e}"))?;
    outcome.map_err(|e| with_port_hint(e, &args))?;
    println!("\nThe demo stopped; its temporary files are gone.");
    drop(stand_ins);
    Ok(())
}

async fn start_stand_ins() -> StandIns {
    let pki = pki::TestPki::new();
    let tokens = TokenBook::default();
    let idp = MockIdp::start(tokens.clone()).await;
    idp.register_client(CLIENT_ID, Some(CLIENT_SECRET));
    idp.set_device_user(USER);
    idp.set_device_outcome(DeviceOutcome::ApproveAfterPolls(1));
    let imap = Arc::new(testkit::imap::start(&pki, tokens.clone()).await);
    let smtp = Arc::new(testkit::smtp::start(&pki, tokens, UpstreamTls::StartTls).await);
    StandIns {
        pki,
        idp,
        imap,
        smtp,
    }
}

/// The proxy's config: the public format, pointed at the stand-ins.
fn config_text(args: &Args, s: &StandIns, dir: &Path, secret: &Path) -> String {
    let base = format!("{}/{TENANT}/oauth2/v2.0", s.idp.base_url());
    let hash = xoauth2_proxy::hash_password(PASSWORD.as_bytes());
    format!(
        r#"# Written by `cargo run --example demo`; see config.example.toml for every key.
[server]
state_dir = "{state}"
shutdown_grace = "2s"

[imap]
listen = "127.0.0.1:{imap}"

[smtp]
listen = "127.0.0.1:{smtp}"

[admin]
listen = "127.0.0.1:{admin}"

# Entra's endpoints and Microsoft 365's servers, replaced by the stand-ins.
[providers.demo]
kind = "microsoft"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
authorize_url = "{base}/authorize"
token_url = "{base}/token"
device_code_url = "{base}/devicecode"
imap_server = "localhost:{imap_port}"
smtp_server = "localhost:{smtp_port}"
# The stand-ins' throw-away CA; certificates are verified as always.
ca_file = "{ca}"

[[accounts]]
username = "{USER}"
password_hash = "{hash}"
provider = "demo"
flow = "device_code"

[[accounts]]
username = "{APP_USER}"
password_hash = "{hash}"
provider = "demo"
flow = "client_credentials"
"#,
        state = dir.join("state").display(),
        imap = args.imap_port,
        smtp = args.smtp_port,
        admin = args.admin_port,
        secret = secret.display(),
        imap_port = s.imap.port(),
        smtp_port = s.smtp.port(),
        ca = s.pki.ca_pem_path.display(),
    )
}

fn welcome(args: &Args) -> Vec<u8> {
    format!(
        "From: xoauth2-proxy demo <demo@xoauth2-proxy.invalid>\r\n\
         To: {USER}\r\n\
         Subject: Welcome to the xoauth2-proxy demo\r\n\
         Date: Thu, 01 Jan 2026 09:00:00 +0000\r\n\
         Message-ID: <welcome@xoauth2-proxy.invalid>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         You are reading this through xoauth2-proxy.\r\n\
         \r\n\
         Your client logged in to the proxy on 127.0.0.1:{imap} with a plain password;\r\n\
         the proxy opened this mailbox with SASL XOAUTH2 and an access token from\r\n\
         the (stand-in) identity provider, over TLS with a verified certificate.\r\n\
         \r\n\
         Send a message through 127.0.0.1:{smtp} to {USER} and it lands here too.\r\n",
        imap = args.imap_port,
        smtp = args.smtp_port,
    )
    .into_bytes()
}

/// Delivers what the SMTP stand-in accepted to the IMAP stand-in's INBOX of
/// each demo recipient, as a real mail system would.
async fn deliver(smtp: Arc<MockSmtpUpstream>, imap: Arc<MockImapUpstream>) {
    loop {
        for message in smtp.take_messages() {
            for rcpt in &message.rcpt_to {
                let address = rcpt
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches(['<', '>']);
                if address.eq_ignore_ascii_case(USER) || address.eq_ignore_ascii_case(APP_USER) {
                    imap.add_message(address, message.data.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for the admin listener's /healthz (the proxy is then serving); false
/// if the proxy stopped first (a port already taken, for example) or 10 s passed.
async fn wait_until_ready(
    admin_port: u16,
    server: &tokio::task::JoinHandle<Result<(), String>>,
) -> bool {
    for _ in 0..200 {
        if server.is_finished() {
            return false;
        }
        if healthz(admin_port).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn healthz(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut reply)).await;
    reply.starts_with(b"HTTP/1.1 200")
}

fn with_port_hint(error: String, args: &Args) -> String {
    if error.contains("cannot listen") {
        format!(
            "{error}\n      (ports {}, {} and {} must be free; choose others with \
             --imap-port, --smtp-port, --admin-port)",
            args.imap_port, args.smtp_port, args.admin_port
        )
    } else {
        error
    }
}

fn print_instructions(args: &Args, welcome_uid: u32, config_path: &Path) {
    let (imap, smtp, admin) = (args.imap_port, args.smtp_port, args.admin_port);
    let user = format!("'{USER}:{PASSWORD}'");
    println!(
        r#"
2. The proxy is serving. Point a mail client on this machine (or NocoBase) at it:

   IMAP server   127.0.0.1   port {imap}   security: none (secure: false, no STARTTLS)
   SMTP server   127.0.0.1   port {smtp}   security: none (secure: false, no STARTTLS)
   username      {USER}
   password      {PASSWORD}

   The INBOX holds a welcome message; mail sent through the proxy to {USER}
   lands there too. ({APP_USER}, same password, is an app-only account:
   client credentials, no sign-in.)

3. Or try it from another terminal:

   curl -s http://127.0.0.1:{admin}/healthz
   curl -s --url 'imap://127.0.0.1:{imap}/INBOX;UID={welcome_uid}' --user {user}
   printf 'Subject: Hello\r\n\r\nSent through xoauth2-proxy.\r\n' | curl -s --url smtp://127.0.0.1:{smtp} --user {user} --mail-from {USER} --mail-rcpt {USER} --upload-file -
   curl -s --url 'imap://127.0.0.1:{imap}/INBOX;UID={next}' --user {user}
   curl -s http://127.0.0.1:{admin}/metrics | grep xoauth2_proxy_logins_total
   cargo run -- status --config {config}

Press Ctrl-C to stop."#,
        next = welcome_uid + 1,
        config = config_path.display(),
    );
}
