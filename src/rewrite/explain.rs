//! Privacy explain: the rewritten plan of a query in plain words, and no data.
//!
//! For each protected table the query touches: the masks, the row filters and the
//! threshold that apply to this principal; then the decision (released automatically,
//! needs approval, or refused) with every reason; and, when it would run, the rewritten
//! logical plan. Nothing here executes the query, and nothing here prints a data value,
//! a count or a mask's secret (§3.7): the masks are named by kind, the plan shows only
//! the analyst's own literals and the policy's k.

use std::fmt::Write;

use datafusion::logical_expr::LogicalPlan;

use super::PolicyContext;
use super::check::analyze;
use super::decision::{Decision, decide};

/// Explains `plan` (the unanalyzed logical plan) and, if given, its analyzed form.
pub fn explain(ctx: &PolicyContext, plan: &LogicalPlan, analyzed: Option<&LogicalPlan>) -> String {
    let report = analyze(plan, ctx);
    let mut out = String::new();
    let _ = writeln!(out, "Privacy explanation for {}", ctx.principal.name);
    if report.scanned.is_empty() {
        let _ = writeln!(
            out,
            "- The query reads no protected table (for you): nothing is rewritten."
        );
    }
    for t in &report.scanned {
        let Some(r) = ctx.tables.get(t) else { continue };
        let _ = writeln!(out, "- {t}:");
        let masked: Vec<String> = if r.unmasked {
            vec![]
        } else {
            r.policy
                .wipe
                .iter()
                .map(|c| {
                    let kind = r
                        .policy
                        .masks
                        .get(c)
                        .map(|k| format!("{k:?}").to_lowercase())
                        .unwrap_or_else(|| "default".into());
                    format!("{c} ({kind})")
                })
                .collect()
        };
        if masked.is_empty() {
            let _ = writeln!(out, "    no column is masked for you");
        } else {
            let _ = writeln!(out, "    masked at the scan: {}", masked.join(", "));
        }
        if r.row_filter.is_some() {
            let _ = writeln!(
                out,
                "    a row filter of your role applies before anything else"
            );
        }
        let unit = r.policy.privacy_unit.as_deref().unwrap_or("each row");
        match &r.policy.release {
            crate::policy::dp::ReleaseMode::Threshold => {
                let _ = writeln!(
                    out,
                    "    every released row must stand for at least {} distinct entities ({unit}); smaller groups are dropped",
                    r.policy.min_group_size
                );
            }
            crate::policy::dp::ReleaseMode::Dp(dp) => {
                let _ = writeln!(
                    out,
                    "    differential privacy: each {unit} counts in at most {} groups with at most {} rows each; \
                     figures are noisy, groups are released only when a noisy count of entities clears a threshold, \
                     and each query is charged to your privacy budget",
                    dp.max_groups_per_unit, dp.max_rows_per_group_per_unit
                );
            }
        }
        let _ = writeln!(
            out,
            "    allowed aggregates: {}",
            r.policy
                .aggregates
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match decide(report, ctx) {
        Decision::Release => {
            let _ = writeln!(
                out,
                "Decision: released automatically, under the rules above."
            );
            if let Some(p) = analyzed {
                let _ = writeln!(out, "Rewritten plan:\n{}", super::fingerprint::full_text(p));
            }
        }
        Decision::Approval(vs) => {
            let _ = writeln!(
                out,
                "Decision: needs the data owner's approval (APPROVAL_PENDING):"
            );
            for v in vs {
                let _ = writeln!(out, "    [{}] {}", v.code, v.message);
            }
        }
        Decision::Refuse(v) => {
            let _ = writeln!(out, "Decision: refused [{}]: {}", v.code, v.message);
        }
    }
    out
}
