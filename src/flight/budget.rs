//! The owners' privacy-budget actions (`airlock budget list|show|grant`): JSON in, JSON
//! out, like the approval actions. Each needs `admin` on `*`; each grant is audited.

use serde::Deserialize;

use crate::approval::budget::{Allowance, BudgetLedger, DELTA_UNITS, Spent};
use crate::audit::{AuditTrail, Event as AuditEvent};
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::policy::PolicySnapshot;
use crate::policy::refusal::{ReasonCode, Refusal};

pub const LIST: &str = "ListBudgets";
pub const SHOW: &str = "ShowBudget";
pub const GRANT: &str = "GrantBudget";

#[derive(Debug, Deserialize)]
struct Show {
    principal: String,
    #[serde(default)]
    roles: Vec<String>,
    dataset: String,
}

#[derive(Debug, Deserialize)]
struct Grant {
    principal: String,
    dataset: String,
    epsilon: f64,
    #[serde(default)]
    delta: f64,
}

/// What is left of a principal's budget on a dataset, as JSON (None: no budget there).
pub async fn remaining_json(
    ledger: &dyn BudgetLedger,
    policy: &PolicySnapshot,
    principal: &str,
    roles: &[String],
    dataset: &str,
) -> Result<Option<serde_json::Value>> {
    let Some(b) = policy
        .tables
        .budgets
        .for_principal(principal, roles, dataset)
    else {
        return Ok(None);
    };
    let allowance = Allowance {
        epsilon_micros: crate::dp::noise::epsilon_micros(b.epsilon.0) as u64,
        delta_units: (b.delta.0 * DELTA_UNITS).floor() as u64,
        renew_secs: b.renew_secs,
    };
    let left = ledger
        .remaining(principal, dataset, &allowance)
        .await
        .map_err(Error::from_store)?;
    Ok(Some(serde_json::json!({
        "dataset": dataset,
        "epsilon_total": b.epsilon.0,
        "delta_total": b.delta.0,
        "renew_secs": b.renew_secs,
        "epsilon_remaining": left.epsilon(),
        "delta_remaining": left.delta(),
    })))
}

/// Whether `action` is one of the budget actions.
pub fn is_action(action: &str) -> bool {
    [LIST, SHOW, GRANT].contains(&action)
}

/// Handles a budget action, or None if `action` is not one.
pub async fn handle(
    action: &str,
    body: &[u8],
    principal: &Principal,
    policy: &PolicySnapshot,
    ledger: &dyn BudgetLedger,
    audit: &dyn AuditTrail,
    rid: &str,
) -> Option<Result<String>> {
    if !is_action(action) {
        return None;
    }
    Some(async {
        if !policy.is_service_admin(principal) {
            return Err(Refusal::new(
                ReasonCode::AccessDenied,
                "privacy budgets are managed by holders of the admin action on *",
            )
            .into());
        }
        let parse = |what: &str| Error::InvalidRequest(format!("{action}: bad body: {what}"));
        match action {
            LIST => {
                let rows = ledger.list().await.map_err(Error::from_store)?;
                Ok(serde_json::to_string(&rows).unwrap_or_default())
            }
            SHOW => {
                let s: Show = serde_json::from_slice(body).map_err(|e| parse(&e.to_string()))?;
                let v = remaining_json(ledger, policy, &s.principal, &s.roles, &s.dataset).await?
                    .unwrap_or_else(|| serde_json::json!({ "dataset": s.dataset, "budget": null }));
                Ok(v.to_string())
            }
            _ => {
                let g: Grant = serde_json::from_slice(body).map_err(|e| parse(&e.to_string()))?;
                if !(g.epsilon.is_finite()
                    && g.epsilon > 0.0
                    && g.delta.is_finite()
                    && g.delta >= 0.0)
                {
                    return Err(parse("epsilon must be positive and delta non-negative"));
                }
                let extra = Spent {
                    epsilon_micros: crate::dp::noise::epsilon_micros(g.epsilon) as u64,
                    delta_units: (g.delta * DELTA_UNITS).floor() as u64,
                };
                // Recorded before it takes effect (as a release is): a grant the trail
                // cannot record is not made. A grant that then fails is recorded too.
                let record = AuditEvent {
                    kind: "budget".into(),
                    principal: principal.name.clone(),
                    request_id: rid.to_string(),
                    decision: "granted".into(),
                    privacy_budget: Some(format!(
                        "{}: granted {} ε={} δ={}",
                        g.dataset, g.principal, g.epsilon, g.delta
                    )),
                    ..Default::default()
                };
                audit
                    .append(record.clone())
                    .await
                    .map_err(Error::AuditUnavailable)?;
                if let Err(e) = ledger
                    .grant(&g.principal, &g.dataset, extra, &principal.name)
                    .await
                {
                    audit.record(AuditEvent {
                        decision: "grant_failed".into(),
                        ..record
                    });
                    return Err(Error::from_store(e));
                }
                Ok(serde_json::json!({ "granted": { "principal": g.principal, "dataset": g.dataset, "epsilon": g.epsilon, "delta": g.delta } }).to_string())
            }
        }
    }.await)
}
