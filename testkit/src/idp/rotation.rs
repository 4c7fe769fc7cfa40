//! Refresh token rotation, and a record of every superseded refresh token
//! presented again (a client that went back to an older grant).
//!
//! Two rules, chosen with [`super::MockIdp::set_rotation`]:
//! - [`Rotation::SpentOnUse`] (the default): a refresh token works once.
//!   The strictest reading: a client that dies after the answer and before
//!   saving the new token has lost its grant, whatever it does.
//! - [`Rotation::SpentWhenSuccessorUsed`]: a redeemed token keeps working
//!   until its successor is presented (real Entra is laxer still: it leaves
//!   a redeemed refresh token valid). A client that saves each new token
//!   before it uses it never loses its grant to a crash; one that goes back
//!   to an older token after using a newer one is refused and recorded.

use std::collections::{HashMap, HashSet};

use super::{Grant, Inner};

/// When a redeemed refresh token stops working.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rotation {
    #[default]
    SpentOnUse,
    SpentWhenSuccessorUsed,
}

/// The lineage of refresh tokens, for [`Rotation::SpentWhenSuccessorUsed`]
/// and the record of superseded tokens.
#[derive(Default)]
pub(super) struct Lineage {
    pub(super) rotation: Rotation,
    /// The token each redeemed token was replaced by (latest redemption).
    successor: HashMap<String, String>,
    /// The token each new token replaced.
    predecessor: HashMap<String, String>,
    /// Tokens that stopped working because a newer one took their place.
    superseded: HashSet<String>,
}

/// `rt` is presented and valid: its grant, after retiring what this
/// presentation supersedes.
pub(super) fn redeem(inner: &mut Inner, rt: &str) -> Grant {
    let grant = inner.refresh[rt].clone();
    match inner.lineage.rotation {
        Rotation::SpentOnUse => retire(inner, rt),
        Rotation::SpentWhenSuccessorUsed => {
            // Using `rt` shows the client has it: the one before is done.
            if let Some(before) = inner.lineage.predecessor.remove(rt) {
                inner.lineage.successor.remove(&before);
                retire(inner, &before);
            }
            // `rt` was redeemed before and its successor never used: the
            // client never got (or lost) that one; a new one replaces it.
            if let Some(unused) = inner.lineage.successor.remove(rt) {
                inner.lineage.predecessor.remove(&unused);
                retire(inner, &unused);
            }
        }
    }
    grant
}

/// `new` was issued by redeeming `replaced`.
pub(super) fn issued(inner: &mut Inner, replaced: &str, new: &str) {
    if inner.lineage.rotation == Rotation::SpentWhenSuccessorUsed
        && inner.refresh.contains_key(replaced)
    {
        let lineage = &mut inner.lineage;
        lineage
            .successor
            .insert(replaced.to_string(), new.to_string());
        lineage
            .predecessor
            .insert(new.to_string(), replaced.to_string());
    }
}

/// `rt` was presented and refused: record it if it was superseded.
pub(super) fn refused(inner: &mut Inner, rt: &str) {
    if inner.lineage.superseded.contains(rt) {
        inner.counts.superseded_refresh_tokens_presented += 1;
    }
}

fn retire(inner: &mut Inner, rt: &str) {
    inner.refresh.remove(rt);
    inner.lineage.superseded.insert(rt.to_string());
}
