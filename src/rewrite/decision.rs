//! The decision for a whole query (PRIVACY.md §1), from the checker's violations.
//!
//! No violation → release; every violation is about tables on which the principal holds
//! `request`, *and so is every other protected table the query reads* →
//! `APPROVAL_PENDING` with every reason; otherwise → refusal with the first violation's
//! code. An approved result is released under masks and row filters only (§4), for every
//! table it reads: a request may not carry a table along on which the principal could
//! not have asked (a DP table's exact sum riding on a patients violation). A violation
//! about no table (a reserved name, an unclassified node) can never go to approval.

use super::PolicyContext;
use super::check::{Analysis, Violation};
use crate::config::TableName;
use crate::policy::refusal::{ReasonCode, Refusal};

/// The outcome of the automatic rules for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Release,
    Approval(Vec<Violation>),
    Refuse(Violation),
}

/// Decides for the whole query (§1), from the checker's analysis.
pub fn decide(analysis: Analysis, ctx: &PolicyContext) -> Decision {
    let Analysis {
        mut violations,
        scanned,
    } = analysis;
    if violations.is_empty() {
        return Decision::Release;
    }
    violations.dedup();
    let may_request = |t: &TableName| ctx.tables.get(t).is_some_and(|r| r.request);
    let can_request = |v: &Violation| !v.tables.is_empty() && v.tables.iter().all(may_request);
    if let Some(v) = violations.iter().find(|v| !can_request(v)) {
        return Decision::Refuse(v.clone());
    }
    match scanned.iter().find(|t| !may_request(t)) {
        Some(t) => {
            let first = &violations[0];
            Decision::Refuse(Violation {
                code: first.code,
                tables: first.tables.clone(),
                message: format!(
                    "{} (an approval would also release {t}, on which you may not request one)",
                    first.message
                ),
            })
        }
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
