//! The policy in force, per table the owner holds `approve` or `admin` on (every table
//! for service admins): who may do what (asked of casbin for every user in the users
//! file), the entity key, k, wiped columns and their masks, row filters and the other
//! settings of `tables.toml`.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Html;

use super::Console;
use super::error::{Error, Result};
use super::session::Owner;
use super::views::Layout;
use crate::catalog::Catalog;
use crate::config::TableName;
use crate::policy::tables::{MaskKind, SmallGroups};
use crate::policy::{Action, PolicySnapshot, TablePolicy};

/// Where a table's settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its section in `tables.toml`.
    Section,
    /// An upload without a section: the product's defaults.
    UploadDefaults,
    /// No section: not protected (only principals holding an action see it).
    Unprotected,
}

/// A table's privacy settings and where they come from.
pub fn settings(
    policy: &PolicySnapshot,
    catalog: &Catalog,
    table: &TableName,
) -> (Source, Option<TablePolicy>) {
    if let Some(tp) = policy.tables.get(table) {
        return (Source::Section, Some(tp.clone()));
    }
    if catalog.is_upload(table)
        && let Some(schema) = catalog.schema(table)
    {
        return (Source::UploadDefaults, Some(TablePolicy::defaults(&schema)));
    }
    (Source::Unprotected, None)
}

/// Settings as the pages show them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: &'static str,
    pub protected: bool,
    pub entity: String,
    pub k: u64,
    /// (column, mask).
    pub wiped: Vec<(String, String)>,
    /// (role, predicate).
    pub row_filters: Vec<(String, String)>,
    pub aggregates: String,
    pub filterable: String,
    pub small_groups: &'static str,
    pub conditional_aggregates: bool,
}

impl Settings {
    pub fn of(policy: &PolicySnapshot, catalog: &Catalog, table: &TableName) -> Self {
        let (source, tp) = settings(policy, catalog, table);
        let source = match source {
            Source::Section => "tables.toml",
            Source::UploadDefaults => "upload: the default policy",
            Source::Unprotected => "no section in tables.toml: not protected",
        };
        let Some(tp) = tp else {
            return Self {
                source,
                protected: false,
                entity: String::new(),
                k: 0,
                wiped: vec![],
                row_filters: vec![],
                aggregates: String::new(),
                filterable: String::new(),
                small_groups: "",
                conditional_aggregates: false,
            };
        };
        let schema = catalog.schema(table);
        let wiped = tp
            .wipe
            .iter()
            .map(|c| {
                let mask = schema
                    .as_ref()
                    .and_then(|s| s.field_with_name(c).ok())
                    .and_then(|f| tp.mask_for(c, f.data_type()));
                let mask = match mask {
                    Some(MaskKind::Star) => "star",
                    Some(MaskKind::Null) => "null",
                    Some(MaskKind::Hash) => "hash",
                    Some(MaskKind::Last4) => "last4",
                    None => "masked",
                };
                (c.clone(), mask.to_string())
            })
            .collect();
        Self {
            source,
            protected: true,
            entity: tp
                .privacy_unit
                .clone()
                .unwrap_or_else(|| "each row is its own entity".into()),
            k: tp.min_group_size,
            wiped,
            row_filters: tp
                .row_filters
                .iter()
                .map(|f| (f.role.clone(), f.predicate.clone()))
                .collect(),
            aggregates: tp.aggregates.iter().cloned().collect::<Vec<_>>().join(", "),
            filterable: tp.filterable.iter().cloned().collect::<Vec<_>>().join(", "),
            small_groups: match tp.small_groups {
                SmallGroups::Drop => "dropped",
                SmallGroups::Remainder => "merged into a remainder row",
            },
            conditional_aggregates: tp.conditional_aggregates,
        }
    }
}

/// One user's rights on one table.
#[derive(Debug, Clone)]
pub struct Grant {
    pub user: String,
    pub roles: String,
    /// One flag per `Action::ALL`.
    pub actions: Vec<bool>,
}

#[derive(Debug, Clone)]
pub struct TableView {
    pub name: String,
    pub settings: Settings,
    pub grants: Vec<Grant>,
}

#[derive(Template)]
#[template(path = "policy.html")]
struct PolicyPage {
    layout: Layout,
    version: u64,
    digest: String,
    actions: Vec<&'static str>,
    tables: Vec<TableView>,
}

/// GET `/policy`.
pub async fn page(State(console): State<Arc<Console>>, Owner(who): Owner) -> Result<Html<String>> {
    let scope = console.scope(&who.principal);
    let policy = console.airlock.sessions.policy().current();
    let catalog = console.airlock.sessions.catalog();
    let mut users: Vec<(&String, &crate::auth::UserEntry)> = console.airlock.users.iter().collect();
    users.sort_by(|a, b| a.0.cmp(b.0));
    let tables = scope
        .tables
        .iter()
        .map(|t| {
            let grants = users
                .iter()
                .filter_map(|(name, entry)| {
                    let p = crate::auth::Principal {
                        name: (*name).clone(),
                        roles: entry.roles.clone(),
                    };
                    let actions: Vec<bool> = Action::ALL
                        .iter()
                        .map(|a| policy.allows(&p, t, *a))
                        .collect();
                    actions.iter().any(|a| *a).then(|| Grant {
                        user: p.name.clone(),
                        roles: entry.roles.join(", "),
                        actions,
                    })
                })
                .collect();
            TableView {
                name: t.to_string(),
                settings: Settings::of(&policy, &catalog, t),
                grants,
            }
        })
        .collect();
    let page = PolicyPage {
        layout: who.layout("policy"),
        version: policy.version,
        digest: policy.digest.chars().take(12).collect(),
        actions: Action::ALL.iter().map(|a| a.as_str()).collect(),
        tables,
    };
    page.render().map(Html).map_err(Error::render)
}
