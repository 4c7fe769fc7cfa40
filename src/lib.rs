//! xoauth2-proxy: a local IMAP/SMTP proxy that lets mail clients which only
//! know a username and a password reach Microsoft 365 mailboxes, which demand
//! OAuth 2.0 (SASL XOAUTH2).
//!
//! The data path, as the modules follow it: a listener ([`server`]) accepts a
//! client; the protocol's pre-login dialogue ([`imap`]) reads its credentials;
//! [`login`] checks them against the configured [`accounts`], gets an access
//! token from the [`oauth`] token manager, and opens the mailbox through
//! [`upstream`]; after that, [`relay`] pipes bytes both ways.

pub mod accounts;
pub mod config;
pub mod error;
pub mod imap;
pub mod lines;
pub mod login;
pub mod oauth;
pub mod relay;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod upstream;
