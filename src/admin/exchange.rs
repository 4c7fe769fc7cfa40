//! What the admin listener's parts share: the response type, and where the
//! config in force is read.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

use crate::shared::Shared;

/// The config in force: replaced whole on reload.
pub type Current = tokio::sync::watch::Receiver<Arc<Shared>>;

/// What one admin response is.
pub type Reply = hyper::Response<Full<Bytes>>;
