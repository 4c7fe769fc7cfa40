//! Sign-ins started from the console and not finished yet: at most one
//! device sign-in per account (pressing Connect again shows the same code
//! while it is valid), and browser sign-ins waiting for their callback,
//! found by their `state` and used once.
//!
//! A device sign-in finishes in a task of its own, so the page that showed
//! the code can go away; the row learns the outcome from the grant store
//! (authorised) or from here (the sentence of a failure).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::oauth::connect::{self, BrowserSignIn, DeviceSignIn};
use crate::shared::Shared;

/// How long a browser has to come back from the identity provider.
const BROWSER_WAIT: Duration = Duration::from_secs(600);
/// Browser sign-ins kept at once (each is a few hundred bytes).
const MAX_BROWSER: usize = 64;

/// A device sign-in as its row shows it.
#[derive(Debug, Clone)]
pub enum Device {
    Waiting {
        user_code: String,
        verification_uri: String,
    },
    Failed(String),
}

struct DeviceEntry {
    shown: Device,
    expires_at: Instant,
    task: Option<AbortHandle>,
}

struct BrowserEntry {
    account: String,
    sign_in: BrowserSignIn,
    started: Instant,
}

#[derive(Default)]
pub struct SignIns {
    devices: Mutex<HashMap<String, DeviceEntry>>,
    browsers: Mutex<HashMap<String, BrowserEntry>>,
}

impl SignIns {
    /// What the row of `account` shows of its device sign-in, if one is
    /// waiting or has failed.
    pub fn device(&self, account: &str) -> Option<Device> {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let entry = devices.get(&account.to_lowercase())?;
        match &entry.shown {
            Device::Waiting { .. } if Instant::now() >= entry.expires_at => None,
            shown => Some(shown.clone()),
        }
    }

    /// Starts a device sign-in for `account` unless one is waiting, and
    /// finishes it in the background.
    pub async fn start_device(
        self: &Arc<Self>,
        shared: Arc<Shared>,
        account: &str,
    ) -> Result<(), String> {
        let key = account.to_lowercase();
        if matches!(self.device(account), Some(Device::Waiting { .. })) {
            return Ok(());
        }
        let sign_in = connect::start_device(&shared.tokens, account).await?;
        let entry = DeviceEntry {
            shown: Device::Waiting {
                user_code: sign_in.user_code.clone(),
                verification_uri: sign_in.verification_uri.clone(),
            },
            expires_at: Instant::now() + sign_in.expires_in,
            task: None,
        };
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = devices.insert(key.clone(), entry).and_then(|e| e.task) {
            old.abort();
        }
        let task = tokio::spawn(finish_device(self.clone(), shared, key.clone(), sign_in));
        if let Some(entry) = devices.get_mut(&key) {
            entry.task = Some(task.abort_handle());
        }
        Ok(())
    }

    /// Forgets `account`'s device sign-in (Disconnect), stopping its poll.
    pub fn cancel_device(&self, account: &str) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = devices.remove(&account.to_lowercase()).and_then(|e| e.task) {
            task.abort();
        }
    }

    fn device_done(&self, key: &str, outcome: Result<(), String>) {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => {
                devices.remove(key);
            }
            Err(sentence) => {
                if let Some(entry) = devices.get_mut(key) {
                    entry.shown = Device::Failed(sentence);
                    entry.task = None;
                }
            }
        }
    }

    /// Starts a browser sign-in for `account` returning to `callback`;
    /// returns the identity provider's URL to send the browser to.
    pub fn start_browser(
        &self,
        shared: &Shared,
        account: &str,
        callback: &str,
    ) -> Result<String, String> {
        let sign_in = connect::start_browser(&shared.tokens, account, callback)?;
        let url = sign_in.url.clone();
        let now = Instant::now();
        let mut browsers = self.browsers.lock().unwrap_or_else(|e| e.into_inner());
        browsers.retain(|_, b| {
            now < b.started + BROWSER_WAIT && !b.account.eq_ignore_ascii_case(account)
        });
        if browsers.len() >= MAX_BROWSER {
            let oldest = browsers
                .iter()
                .min_by_key(|(_, b)| b.started)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                browsers.remove(&oldest);
            }
        }
        browsers.insert(
            sign_in.state.clone(),
            BrowserEntry {
                account: account.to_string(),
                sign_in,
                started: now,
            },
        );
        Ok(url)
    }

    /// The browser sign-in `state` belongs to, taken (a state is used
    /// once); `None` for an unknown or expired one.
    pub fn take_browser(&self, state: &str) -> Option<(String, BrowserSignIn)> {
        let mut browsers = self.browsers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = browsers.remove(state)?;
        (Instant::now() < entry.started + BROWSER_WAIT).then_some((entry.account, entry.sign_in))
    }
}

/// Polls the identity provider until the person has signed in, then
/// stores the grant; the outcome goes to the row.
async fn finish_device(
    sign_ins: Arc<SignIns>,
    shared: Arc<Shared>,
    key: String,
    sign_in: DeviceSignIn,
) {
    let outcome = connect::finish_device(&shared.tokens, &key, &sign_in).await;
    match &outcome {
        Ok(()) => info!(account = %key, "connected from the console (device code)"),
        Err(e) => warn!(account = %key, "connect from the console failed: {e}"),
    }
    sign_ins.device_done(&key, outcome);
}
