//! The decision for a whole query (PRIVACY.md §1), from the checker's violations.
//!
//! No violation → release; every violation is about tables on which the principal holds
//! `request` → `APPROVAL_PENDING` with every reason; otherwise → refusal with the first
//! violation's code. A violation about no table (a reserved name, an unclassified node)
//! can never go to approval.

use super::PolicyContext;
use super::check::Violation;
use crate::policy::refusal::{ReasonCode, Refusal};

/// The outcome of the automatic rules for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Release,
    Approval(Vec<Violation>),
    Refuse(Violation),
}

/// Decides for the whole query (§1).
pub fn decide(mut violations: Vec<Violation>, ctx: &PolicyContext) -> Decision {
    if violations.is_empty() {
        return Decision::Release;
    }
    violations.dedup();
    let can_request = |v: &Violation| {
        !v.tables.is_empty()
            && v.tables
                .iter()
                .all(|t| ctx.tables.get(t).is_some_and(|r| r.request))
    };
    match violations.iter().find(|v| !can_request(v)) {
        Some(v) => Decision::Refuse(v.clone()),
        None => Decision::Approval(violations),
    }
}

/// The refusal a decision ends in, if any.
pub fn refusal(decision: Decision) -> Option<Refusal> {
    match decision {
        Decision::Release => None,
        Decision::Refuse(v) => Some(Refusal::new(v.code, v.message)),
        Decision::Approval(vs) => Some(Refusal::new(
            ReasonCode::ApprovalPending,
            vs.iter()
                .map(|v| format!("{}: {}", v.code, v.message))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}
