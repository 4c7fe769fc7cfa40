//! Everything a proxy test needs, started together: the test PKI, the mock
//! identity provider, the mock IMAP and SMTP upstreams, and a raw client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::idp::MockIdp;
use crate::imap::{self, MockImapUpstream};
use crate::pki::TestPki;
use crate::proxy::{AccountSpec, Endpoints, TestProxy};
use crate::smtp::{self, MockSmtpUpstream, UpstreamTls};
use crate::tokens::TokenBook;

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_SECRET: &str = "app-secret-Qx8~vL2pR7mN";

/// The mock parties, started.
pub struct World {
    pub pki: TestPki,
    pub tokens: TokenBook,
    pub idp: MockIdp,
    pub imap: MockImapUpstream,
    pub smtp: MockSmtpUpstream,
    pub endpoints: Endpoints,
}

impl World {
    pub async fn start() -> World {
        let pki = TestPki::new();
        let tokens = TokenBook::default();
        let idp = MockIdp::start(tokens.clone()).await;
        idp.register_client(CLIENT_ID, Some(CLIENT_SECRET));
        let imap = imap::start(&pki, tokens.clone()).await;
        let smtp = smtp::start(&pki, tokens.clone(), UpstreamTls::StartTls).await;
        let endpoints = Endpoints {
            idp_base: idp.base_url(),
            tenant: TENANT.to_string(),
            client_id: CLIENT_ID.to_string(),
            client_secret: Some(CLIENT_SECRET.to_string()),
            imap_port: imap.port(),
            smtp_port: smtp.port(),
            ca_file: pki.ca_pem_path.clone(),
        };
        World {
            pki,
            tokens,
            idp,
            imap,
            smtp,
            endpoints,
        }
    }

    /// Starts the proxy with `accounts`, each delegated one already holding
    /// a grant (as after `xoauth2-proxy login`).
    pub async fn proxy(&self, accounts: &[AccountSpec]) -> TestProxy {
        let proxy = TestProxy::start(&self.endpoints, accounts).await;
        for a in accounts.iter().filter(|a| a.flow != "client_credentials") {
            self.grant(&proxy, a);
        }
        proxy
    }

    /// Writes a grant file for `account` as `login` would.
    pub fn grant(&self, proxy: &TestProxy, account: &AccountSpec) {
        self.grant_in(&proxy.state_dir, account);
    }

    /// Writes a grant file for `account` under `state_dir` as `login` would.
    pub fn grant_in(&self, state_dir: &std::path::Path, account: &AccountSpec) {
        let mailbox = account
            .mailbox
            .clone()
            .unwrap_or_else(|| account.username.clone());
        let refresh = self.idp.issue_refresh_token(&mailbox);
        let dir = state_dir.join("tokens");
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::json!({
            "account": account.username,
            "flow": account.flow,
            "refresh_token": refresh,
            "needs_login": false,
        });
        std::fs::write(
            dir.join(format!("{}.json", account.username.to_lowercase())),
            json.to_string(),
        )
        .unwrap();
    }

    /// Every secret the tests know of: tokens, grants, the client secret.
    pub fn secrets(&self) -> Vec<String> {
        let mut all = self.idp.secrets_ever();
        all.extend(self.tokens.all_tokens());
        all.push(CLIENT_SECRET.to_string());
        all
    }
}

/// A line-oriented client for driving the proxy by hand.
pub struct LineClient {
    pub stream: BufReader<TcpStream>,
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> LineClient {
        let stream = TcpStream::connect(addr).await.expect("the proxy accepts");
        LineClient {
            stream: BufReader::new(stream),
        }
    }

    /// Connects to an IMAP listener, logs in as `user` with `pass` and
    /// returns the tagged answer (`a OK …`, `a NO …`).
    pub async fn imap_login(addr: SocketAddr, user: &str, pass: &str) -> String {
        let mut c = LineClient::connect(addr).await;
        c.read().await;
        c.line(&format!("a LOGIN {user} {pass}")).await;
        c.until("a ").await.pop().unwrap()
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
    }

    /// Sends `line` plus CRLF.
    pub async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes()).await;
    }

    /// Reads one line (without CRLF); `None` at EOF. Panics after 15 s.
    pub async fn read(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(
            Duration::from_secs(15),
            self.stream.read_until(b'\n', &mut buf),
        )
        .await
        .expect("a reply within 15 s")
        .ok()?;
        if n == 0 {
            return None;
        }
        Some(
            String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        )
    }

    /// Reads lines until one starts with `prefix`; returns all of them.
    pub async fn until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self
                .read()
                .await
                .unwrap_or_else(|| panic!("connection closed before {prefix:?}; got {lines:?}"));
            let done = line.starts_with(prefix);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut buf))
            .await
            .expect("data within 30 s")
            .unwrap();
        buf
    }

    /// True when the server closed the connection (EOF) within 15 s.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(15), self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        )
    }
}
