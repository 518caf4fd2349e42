//! The behaviour every state store must have, as cases run against each one: the
//! embedded SQLite store in unit tests, PostgreSQL in the integration tests (a real
//! server). A store that passes these keeps the promises PRIVACY.md §4–§5b rely on.

use std::sync::Arc;

use crate::approval::budget::{Allowance, BudgetLedger, Charge, QueryIdentity, Spent};
use crate::approval::{ApprovalStore, Decision, Error, NewRequest, RequestKey, Status};

fn new(principal: &str, fingerprint: &str) -> NewRequest {
    NewRequest {
        key: RequestKey {
            principal: principal.into(),
            fingerprint: fingerprint.into(),
            params: "[]".into(),
            policy: "v1".into(),
        },
        roles: vec!["r".into()],
        sql: "SELECT 1".into(),
        tables: vec!["s.t".into()],
        reasons: "AGGREGATE_REQUIRED".into(),
        plan: "Projection".into(),
    }
}

/// Asking twice finds one request; a decision sticks and is taken once; single-use
/// approvals are used once; expired ones release nothing. `prefix` keeps the cases of
/// one store apart from another run's.
pub async fn approvals(store: &dyn ApprovalStore, prefix: &str) {
    let ann = format!("{prefix}ann");
    let a = store.find_or_create(new(&ann, "f1"), 100).await.unwrap();
    let b = store.find_or_create(new(&ann, "f1"), 101).await.unwrap();
    assert_eq!(a.id, b.id, "asking twice finds the same request");
    let c = store
        .find_or_create(new(&format!("{prefix}bob"), "f1"), 101)
        .await
        .unwrap();
    assert_ne!(a.id, c.id);
    let (decided, _) = store
        .decide(
            &a.id,
            Decision::Approve {
                max_rows: Some(5),
                expires_at: 200,
                reusable: false,
            },
            "owner",
            110,
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(decided.decided_by.as_deref(), Some("owner"));
    assert!(matches!(
        store
            .decide(
                &a.id,
                Decision::Deny { reason: "x".into() },
                "owner",
                111,
                &Default::default()
            )
            .await,
        Err(Error::AlreadyDecided(_))
    ));
    assert!(matches!(
        store.get(&format!("{prefix}missing")).await,
        Err(Error::NotFound(_))
    ));
    assert!(store.consume(&a.id, 120).await.unwrap());
    assert!(!store.consume(&a.id, 121).await.unwrap(), "single use");
    let d = store.find_or_create(new(&ann, "f1"), 130).await.unwrap();
    assert_ne!(d.id, a.id, "a used approval no longer matches");
    assert_eq!(d.status, Status::Pending);

    let e = store.find_or_create(new(&ann, "f2"), 100).await.unwrap();
    store
        .decide(
            &e.id,
            Decision::Approve {
                max_rows: None,
                expires_at: 150,
                reusable: true,
            },
            "o",
            110,
            &Default::default(),
        )
        .await
        .unwrap();
    assert!(store.consume(&e.id, 140).await.unwrap());
    assert!(store.consume(&e.id, 141).await.unwrap(), "reusable");
    assert!(!store.consume(&e.id, 150).await.unwrap(), "expired");

    let f = store.find_or_create(new(&ann, "f3"), 100).await.unwrap();
    let (denied, _) = store
        .decide(
            &f.id,
            Decision::Deny {
                reason: "too fine".into(),
            },
            "o",
            110,
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        denied.status,
        Status::Denied {
            reason: "too fine".into()
        }
    );
    assert!(!store.consume(&f.id, 120).await.unwrap(), "denied");

    let mine: Vec<_> = store
        .list(false)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.key.principal.starts_with(prefix))
        .collect();
    assert_eq!(mine.len(), 5);
    let pending: Vec<_> = store
        .list(true)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.key.principal.starts_with(prefix))
        .collect();
    assert_eq!(pending.len(), 2, "bob's and ann's second f1");
}

/// A query identity of `principal` on the `hospital` dataset.
pub fn query(principal: &str, fp: &str, eps: u64) -> QueryIdentity {
    QueryIdentity {
        principal: principal.into(),
        dataset: "hospital".into(),
        fingerprint: fp.into(),
        epsilon_micros: eps,
        policy: "v1".into(),
        data: "d1".into(),
    }
}

/// Ten ε, a little δ, no renewal.
pub const TEN: Allowance = Allowance {
    epsilon_micros: 10_000_000,
    delta_units: 1_000_000,
    renew_secs: None,
};

/// `eps` micro-ε and one δ unit.
pub fn cost(eps: u64) -> Spent {
    Spent {
        epsilon_micros: eps,
        delta_units: 1,
    }
}

/// Charges, repeats (one seed, one kept answer), exhaustion and grants.
pub async fn ledger(l: &dyn BudgetLedger, principal: &str) {
    let Charge::Charged { seed, remaining } = l
        .charge(&query(principal, "a", 1_000_000), cost(1_000_000), &TEN)
        .await
        .unwrap()
    else {
        panic!("first charge")
    };
    assert_eq!(remaining.epsilon_micros, 9_000_000);
    assert_eq!(
        l.charge(&query(principal, "a", 1_000_000), cost(1_000_000), &TEN)
            .await
            .unwrap(),
        Charge::Repeat { seed, answer: None }
    );
    let key = query(principal, "a", 1_000_000).key();
    assert_eq!(
        l.keep_answer(&key, b"first".to_vec()).await.unwrap(),
        b"first"
    );
    assert_eq!(
        l.keep_answer(&key, b"second".to_vec()).await.unwrap(),
        b"first",
        "only one answer per identity ever leaves"
    );
    assert_eq!(
        l.charge(&query(principal, "a", 1_000_000), cost(1_000_000), &TEN)
            .await
            .unwrap(),
        Charge::Repeat {
            seed,
            answer: Some(b"first".to_vec())
        }
    );
    for i in 0..9 {
        assert!(matches!(
            l.charge(
                &query(principal, &format!("q{i}"), 1_000_000),
                cost(1_000_000),
                &TEN
            )
            .await
            .unwrap(),
            Charge::Charged { .. }
        ));
    }
    assert_eq!(
        l.charge(&query(principal, "z", 1), cost(1), &TEN)
            .await
            .unwrap(),
        Charge::Exhausted {
            remaining: Spent {
                epsilon_micros: 0,
                delta_units: 1_000_000 - 10
            }
        }
    );
    assert_eq!(
        l.remaining(principal, "hospital", &TEN)
            .await
            .unwrap()
            .epsilon_micros,
        0
    );
    l.grant(principal, "hospital", cost(500_000), "owner")
        .await
        .unwrap();
    assert!(matches!(
        l.charge(&query(principal, "z", 500_000), cost(500_000), &TEN)
            .await
            .unwrap(),
        Charge::Charged { .. }
    ));
    let rows = l.list().await.unwrap();
    let row = rows.iter().find(|r| r.principal == principal).unwrap();
    assert_eq!(row.charges, 11);
    assert!((row.epsilon_spent - 10.5).abs() < 1e-9);
    assert!((row.epsilon_granted - 0.5).abs() < 1e-9);
}

/// Many tasks on several ledgers (one per front end) racing to spend one principal's
/// budget: exactly the budget is spent, never more.
pub async fn concurrent_charges(ledgers: Vec<Arc<dyn BudgetLedger>>, principal: &str) {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let l = Arc::clone(&ledgers[t % ledgers.len()]);
        let principal = principal.to_string();
        tasks.push(tokio::spawn(async move {
            let mut charged = 0;
            for i in 0..5 {
                if let Charge::Charged { .. } = l
                    .charge(
                        &query(&principal, &format!("t{t}-{i}"), 700_000),
                        cost(700_000),
                        &TEN,
                    )
                    .await
                    .unwrap()
                {
                    charged += 1;
                }
            }
            charged
        }));
    }
    let mut charged = 0;
    for t in tasks {
        charged += t.await.unwrap();
    }
    // 10 / 0.7 = 14 charges fit; 40 were attempted.
    assert_eq!(charged, 14);
    assert_eq!(
        ledgers[0]
            .remaining(principal, "hospital", &TEN)
            .await
            .unwrap()
            .epsilon_micros,
        200_000
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    // `approvals` and `ledger` run on SQLite in `approval::sqlite` and `approval::budget`
    // (with a reopen after them).
    #[tokio::test]
    async fn embedded_ledgers_racing_cannot_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let ledgers: Vec<Arc<dyn BudgetLedger>> = (0..2)
            .map(|_| {
                Arc::new(crate::approval::budget::Ledger::open(dir.path()).unwrap())
                    as Arc<dyn BudgetLedger>
            })
            .collect();
        concurrent_charges(ledgers, "racer").await;
    }
}
