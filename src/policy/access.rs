//! casbin access rules: `model.conf` + `policy.csv`, validated line by line.
//!
//! Objects are tables as `schema.table` (patterns may use `*`, matched with `keyMatch`);
//! the object `*` alone stands for the whole service, so service-wide operations (policy
//! reload, the audit log, every request) need `admin` on `*`. Users' roles from the users
//! file become `g` groupings. Any enforcer error denies.

use std::path::Path;
use std::sync::Arc;

use casbin::{CoreApi, DefaultModel, Enforcer, StringAdapter};

use super::Action;
use crate::auth::{Principal, Users};
use crate::config::{Collector, Diagnostic, Diagnostics};

/// The object that stands for the service itself.
pub const SERVICE_OBJECT: &str = "*";

/// A loaded, validated casbin enforcer.
pub struct AccessPolicy {
    enforcer: Enforcer,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy").finish_non_exhaustive()
    }
}

impl AccessPolicy {
    /// Builds the enforcer from the two files' texts. `policy.csv` is checked line by line
    /// before casbin sees it, so that each error names its line.
    pub async fn load(
        model_path: &Path,
        model_text: &str,
        policy_path: &Path,
        policy_text: &str,
        users: &Users,
    ) -> Result<Self, Diagnostics> {
        let mut out = Collector::default();
        check_model(model_path, model_text, &mut out);
        check_policy_lines(policy_path, policy_text, &mut out);
        out.finish(())?;
        let model = DefaultModel::from_str(model_text).await.map_err(|e| {
            Diagnostics::one(Diagnostic::new(
                model_path,
                None,
                format!("casbin model: {e}"),
            ))
        })?;
        // Users' roles become groupings; the string adapter is read-only, so they are
        // appended to the policy text it reads.
        let mut text = policy_text.to_string();
        for (name, entry) in users.iter() {
            for role in &entry.roles {
                text.push_str(&format!("\ng, {name}, {role}"));
            }
        }
        let enforcer = Enforcer::new(model, StringAdapter::new(text))
            .await
            .map_err(|e| {
                Diagnostics::one(Diagnostic::new(policy_path, None, format!("casbin: {e}")))
            })?;
        Ok(Self { enforcer })
    }

    /// Whether `principal` holds `action` on `object`. Errors deny.
    pub fn allows(&self, principal: &Principal, object: &str, action: Action) -> bool {
        match self
            .enforcer
            .enforce((principal.name.as_str(), object, action.as_str()))
        {
            Ok(allowed) => allowed,
            Err(e) => {
                tracing::error!(principal = %principal.name, object, action = action.as_str(), error = %e, "casbin enforcer error; denying");
                false
            }
        }
    }
}

fn check_model(path: &Path, text: &str, out: &mut Collector) {
    let mut section = String::new();
    let mut seen = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            if !line.ends_with(']') {
                out.push(Diagnostic::new(
                    path,
                    Some(i + 1),
                    "unclosed section header",
                ));
            }
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            seen.push(section.clone());
            continue;
        }
        if !line.contains('=') {
            out.push(Diagnostic::new(
                path,
                Some(i + 1),
                format!("expected `key = value` in [{section}]"),
            ));
        }
    }
    for required in [
        "request_definition",
        "policy_definition",
        "policy_effect",
        "matchers",
    ] {
        if !seen.iter().any(|s| s == required) {
            out.push(Diagnostic::new(
                path,
                None,
                format!("missing section [{required}]"),
            ));
        }
    }
}

fn check_policy_lines(path: &Path, text: &str, out: &mut Collector) {
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let at = Some(i + 1);
        match fields[0] {
            "p" => {
                if fields.len() != 4 || fields.iter().any(|f| f.is_empty()) {
                    out.push(Diagnostic::new(
                        path,
                        at,
                        "a `p` line is `p, subject, schema.table, action`",
                    ));
                    continue;
                }
                if Action::parse(fields[3]).is_none() {
                    out.push(Diagnostic::new(
                        path,
                        at,
                        format!(
                            "unknown action {:?}; expected one of {}",
                            fields[3],
                            Action::ALL.map(Action::as_str).join(", ")
                        ),
                    ));
                }
                let obj = fields[2];
                let ok = obj == SERVICE_OBJECT
                    || obj.split('.').count() == 2
                        && obj.split('.').all(|p| {
                            !p.is_empty()
                                && p.chars().all(|c| {
                                    c.is_ascii_lowercase()
                                        || c.is_ascii_digit()
                                        || c == '_'
                                        || c == '*'
                                })
                        });
                if !ok {
                    out.push(Diagnostic::new(
                        path,
                        at,
                        format!("object {obj:?} must be schema.table (with optional *) or *"),
                    ));
                }
            }
            "g" => {
                if fields.len() != 3 || fields.iter().any(|f| f.is_empty()) {
                    out.push(Diagnostic::new(path, at, "a `g` line is `g, member, role`"));
                }
            }
            other => out.push(Diagnostic::new(
                path,
                at,
                format!("unknown policy type {other:?}; expected p or g"),
            )),
        }
    }
}

/// Convenience for tests and the demo.
pub async fn from_texts(
    model: &str,
    policy: &str,
    users: &Users,
) -> Result<Arc<AccessPolicy>, Diagnostics> {
    AccessPolicy::load(
        Path::new("model.conf"),
        model,
        Path::new("policy.csv"),
        policy,
        users,
    )
    .await
    .map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserEntry;

    const MODEL: &str = include_str!("../../policies/model.conf");

    fn users() -> Users {
        Users::from_entries([(
            "ann".to_string(),
            UserEntry {
                roles: vec!["analyst".into()],
                ..Default::default()
            },
        )])
    }

    #[tokio::test]
    async fn roles_and_wildcards() {
        let p = from_texts(
            MODEL,
            "p, analyst, hospital.*, aggregate\np, boss, *, admin\ng, bob, boss\n",
            &users(),
        )
        .await
        .unwrap();
        let ann = Principal {
            name: "ann".into(),
            roles: vec![],
        };
        let bob = Principal {
            name: "bob".into(),
            roles: vec![],
        };
        assert!(p.allows(&ann, "hospital.patients", Action::Aggregate));
        assert!(!p.allows(&ann, "hospital.patients", Action::Read));
        assert!(!p.allows(&ann, "other.t", Action::Aggregate));
        assert!(p.allows(&bob, SERVICE_OBJECT, Action::Admin));
        assert!(p.allows(&bob, "any.table", Action::Admin));
        assert!(!p.allows(&ann, SERVICE_OBJECT, Action::Aggregate));
    }

    #[tokio::test]
    async fn bad_lines_are_named() {
        let err = from_texts(
            MODEL,
            "p, analyst, hospital.*, aggregate\n\np, analyst, hospital.*, drop\nx, y\n",
            &users(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("policy.csv:3: unknown action \"drop\""),
            "{err}"
        );
        assert!(err.contains("policy.csv:4: unknown policy type"), "{err}");
    }
}
