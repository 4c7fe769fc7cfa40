//! The realism run: the same IMAP figures against a real Dovecot (the mail
//! server of the end-to-end suite, installed by tests/e2e/install.sh), which
//! checks XOAUTH2 tokens at the mock identity provider's RFC 7662
//! introspection endpoint (`POST /introspect`), stores mail in a Maildir and
//! forks a process per login. The harness starts its own instance from its own
//! config on a free loopback port, and stops it at the end.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_rustls::TlsConnector;

use crate::client::{self, Credentials, Route};
use crate::report::{Results, Via, slot};
use crate::world::{MAILBOX, WorldInfo};
use crate::{Transfer, Way, procs, rotated, say, transfer_once};

/// What the Dovecot run does.
pub struct Plan {
    pub fetch_bytes: usize,
    pub append_bytes: usize,
    pub reps: usize,
    pub login_cycles: usize,
}

const DOVECOT: &str = "/usr/sbin/dovecot";

/// Asks the identity provider's introspection endpoint about `token`.
async fn introspect(idp_base: &str, token: &str) -> Result<String, String> {
    let hostport = idp_base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(hostport)
        .await
        .map_err(|e| format!("{idp_base}: {e}"))?;
    let body = format!("token={token}");
    let request = format!(
        "POST /introspect HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(answer)
}

/// Runs the Dovecot part and returns its report section.
pub async fn run(
    bin: &Path,
    password_hash: &str,
    world: &WorldInfo,
    refresh_token: String,
    plan: &Plan,
    connector: &TlsConnector,
) -> Result<String, String> {
    if !Path::new(DOVECOT).exists() {
        return Err(format!(
            "{DOVECOT} is not installed (tests/e2e/install.sh installs it)"
        ));
    }
    let answer = introspect(&world.idp_base, &world.direct_token).await?;
    if !answer.contains("\"active\":true") {
        return Err(
            "the mock identity provider has no RFC 7662 introspection endpoint (POST /introspect) in this \
             build of testkit/src/idp/, which Dovecot needs to check XOAUTH2 tokens"
                .into(),
        );
    }
    say("Dovecot: starting an instance of its own");
    // Mail on tmpfs where there is one, so that the disk's noise is not measured.
    let parent = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    let dir = tempfile::Builder::new()
        .prefix("xoauth2-bench-dovecot-")
        .tempdir_in(parent)
        .map_err(|e| e.to_string())?;
    let d = dir.path();
    for sub in ["run", "state", "home", "mail"] {
        std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
    }
    // The one big message, already delivered (UID 1 once Dovecot has seen it).
    let maildir = d.join("mail").join(MAILBOX);
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).map_err(|e| e.to_string())?;
    }
    let message = client::message(plan.fetch_bytes, "the big one");
    std::fs::write(
        maildir.join(format!("cur/1700000000.M1P1.bench,S={}:2,S", message.len())),
        &message,
    )
    .map_err(|e| e.to_string())?;
    drop(message);
    let status = std::process::Command::new("chown")
        .args(["-R", "vmail:vmail"])
        .arg(d.join("mail"))
        .arg(d.join("home"))
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(
            "cannot give the Maildir to the user vmail (tests/e2e/install.sh creates it)".into(),
        );
    }
    // Dovecot's processes must reach the config and the folders.
    let _ = std::process::Command::new("chmod")
        .arg("755")
        .arg(d)
        .status();

    let port = procs::free_port();
    let oauth2 = d.join("dovecot-oauth2.conf.ext");
    std::fs::write(
        &oauth2,
        format!(
            "introspection_url = {}/introspect\nintrospection_mode = post\nforce_introspection = yes\n\
             username_attribute = email\nactive_attribute = active\nactive_value = true\n",
            world.idp_base
        ),
    )
    .map_err(|e| e.to_string())?;
    let conf = d.join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            r#"protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
instance_name = xoauth2-bench
log_path = {d}/dovecot.log
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
auth_mechanisms = xoauth2 oauthbearer
mail_location = maildir:{d}/mail/%u
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 1
default_login_user = dovenull
default_internal_user = dovecot
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2}
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={d}/home/%u
}}
"#,
            d = d.display(),
            cert = world.cert_file,
            key = world.key_file,
            oauth2 = oauth2.display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    // The PKI's files live in the world's private temporary folder: make them readable.
    for f in [&world.cert_file, &world.key_file] {
        if let Some(parent) = Path::new(f).parent() {
            let _ = std::process::Command::new("chmod")
                .arg("755")
                .arg(parent)
                .status();
        }
    }

    let mut dovecot = Command::new(DOVECOT)
        .arg("-F")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{DOVECOT}: {e}"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline || matches!(dovecot.try_wait(), Ok(Some(_))) {
            let log = std::fs::read_to_string(d.join("dovecot.log")).unwrap_or_default();
            return Err(format!("Dovecot did not start; its log:\n{log}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let upstream = procs::Upstream {
        world,
        refresh_token,
        imap: ("localhost".into(), port),
        smtp: ("localhost".into(), world.smtp_port),
        smtp_tls: "implicit",
    };
    let outcome = measure(bin, password_hash, &upstream, addr, plan, connector, world).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &dovecot.id().unwrap_or(0).to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(10), dovecot.wait()).await;
    let log = std::fs::read_to_string(d.join("dovecot.log")).unwrap_or_default();
    let results = outcome.map_err(|e| {
        format!(
            "{e}; Dovecot's log ends:\n```\n{}\n```",
            log.lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let version = std::process::Command::new(DOVECOT)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok(format!(
        "### Against Dovecot {version} (realism run)\n\n\
         Dovecot checks each XOAUTH2 token at the mock identity provider's introspection endpoint, \
         forks a login process per connection and serves the Maildir from tmpfs. IMAP only \
         (SMTP would need Postfix), no email-oauth2-proxy (its client-credentials token would \
         need the identity provider to name a mailbox for app tokens), no idle tiers.\n\n{}\n{}",
        results.table_dovecot(),
        results.notes()
    ))
}

async fn measure(
    bin: &Path,
    password_hash: &str,
    upstream: &procs::Upstream<'_>,
    addr: std::net::SocketAddr,
    plan: &Plan,
    connector: &TlsConnector,
    world: &WorldInfo,
) -> Result<Results, String> {
    let ours = procs::start_ours(bin, password_hash, upstream, 256, false).await?;
    let direct = Way {
        via: Via::Direct,
        imap: Route::Tls {
            addr,
            name: "localhost".into(),
            connector: connector.clone(),
        },
        smtp: Route::Plain(addr),
        credentials: Credentials::Token {
            user: MAILBOX.into(),
            token: world.direct_token.clone(),
        },
        pid: None,
    };
    let paths = vec![crate::proxied(Via::Ours, &ours), direct];
    let mut results = Results {
        fetch_bytes: plan.fetch_bytes,
        append_bytes: plan.append_bytes,
        ..Default::default()
    };
    for p in &paths {
        for _ in 0..3 {
            client::login_cycle(&p.imap, &p.credentials)
                .await
                .map_err(|e| format!("a first login via {} failed: {e}", p.via.name()))?;
        }
    }
    let append = client::message(plan.append_bytes, "appended");
    for kind in [Transfer::Fetch, Transfer::Append] {
        say(&format!("Dovecot: {kind:?}"));
        for rep in 0..plan.reps {
            let mut this_rep: [Option<f64>; 3] = [None; 3];
            for path in rotated(&paths, rep) {
                let th = &mut crate::set_of(&mut results, kind)[slot(path.via)];
                match transfer_once(&path, kind, &append, plan.fetch_bytes, None).await {
                    Ok(sample) => {
                        this_rep[slot(path.via)] = Some(sample.mbps);
                        sample.add_to(th);
                    }
                    Err(e) => th.errors.push(e),
                }
            }
            if let [Some(o), Some(d), _] = this_rep {
                crate::set_of(&mut results, kind)[0]
                    .paired_direct
                    .push(o / d);
            }
        }
    }
    say(&format!(
        "Dovecot: {} login cycles per path",
        plan.login_cycles
    ));
    const BLOCKS: usize = 10;
    for block in 0..BLOCKS {
        for path in rotated(&paths, block) {
            let l = &mut results.logins[slot(path.via)];
            for _ in 0..plan.login_cycles.div_ceil(BLOCKS) {
                if l.errors.len() >= 10 {
                    break;
                }
                match client::login_cycle(&path.imap, &path.credentials).await {
                    Ok(d) => l.ms.push(d.as_secs_f64() * 1e3),
                    Err(e) => l.errors.push(e.to_string()),
                }
            }
        }
    }
    ours.stop().await;
    Ok(results)
}
