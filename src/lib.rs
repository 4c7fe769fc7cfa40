//! xoauth2-proxy: a local IMAP/SMTP proxy that lets mail clients which only
//! know a username and a password reach Microsoft 365 mailboxes, which demand
//! OAuth 2.0 (SASL XOAUTH2).
//!
//! The data path, as the modules follow it: a listener ([`server`]) accepts a
//! client; the protocol's pre-login dialogue ([`imap`], [`smtp`]) reads its credentials;
//! [`login`] checks them against the configured [`accounts`], gets an access
//! token from the [`oauth`] token manager, and opens the mailbox through
//! [`upstream`]; after that, [`relay`] pipes IMAP bytes both ways, and SMTP
//! transactions borrow pooled upstream connections ([`smtp::pool`]).

pub mod accounts;
pub mod admin;
pub mod check;
pub mod config;
pub mod error;
pub mod imap;
pub mod lines;
pub mod login;
pub mod metrics;
pub mod oauth;
pub mod relay;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod smtp;
pub mod upstream;
