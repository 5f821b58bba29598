//! Whether a read may be cached, decided from its analysis and the
//! catalog: every function immutable, every table a plain (or partitioned,
//! or materialized) one that is not temporary, not the catalog, not a
//! sequence and without row-level security — unless a rule says otherwise.

use std::time::Duration;

use super::catalog::{Catalog, SYSTEM_SCHEMAS};
use crate::config::{CacheConfig, CacheRule};
use crate::sql::analyze::{Analysis, Name, Reason};

/// A cacheable read: the tables whose generations guard it, and its TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub tables: Vec<u32>,
    pub ttl: Duration,
}

pub fn decide(
    analysis: &Analysis,
    catalog: &Catalog,
    schemas: &[String],
    database: &str,
    config: &CacheConfig,
) -> Result<Decision, Reason> {
    if let Some(reason) = analysis.not_cacheable {
        return Err(reason);
    }
    if !analysis.is_cacheable_candidate() {
        return Err(Reason::NotRead);
    }
    // A CTE that shares a table's name may hide that table from one scope
    // and not another; rather than track scopes, do not cache.
    for cte in &analysis.cte_names {
        let as_table = Name {
            schema: None,
            name: cte.clone(),
        };
        if catalog.resolve(&as_table, schemas).is_some() {
            return Err(Reason::CteShadowsTable);
        }
    }
    for function in &analysis.functions {
        if is_listed_immutable(function, &config.immutable_functions) || is_syntax(function) {
            continue;
        }
        match catalog.function_volatility(function, schemas) {
            None => return Err(Reason::UnknownFunction),
            Some(b'i') => {}
            Some(_) => return Err(Reason::VolatileFunction),
        }
    }
    let mut ttl = analysis.hints.ttl.unwrap_or(config.default_ttl);
    let mut tables = Vec::new();
    let mut stack: Vec<u32> = Vec::new();
    for name in &analysis.reads {
        if name.schema.is_none() && analysis.cte_names.contains(&name.name) {
            continue;
        }
        stack.push(catalog.resolve(name, schemas).ok_or(Reason::UnknownTable)?);
    }
    while let Some(oid) = stack.pop() {
        if tables.contains(&oid) {
            continue;
        }
        let relation = catalog.relation(oid).ok_or(Reason::UnknownTable)?;
        if SYSTEM_SCHEMAS.contains(&relation.schema.as_str()) {
            return Err(Reason::SystemCatalog);
        }
        if relation.temporary {
            return Err(Reason::TemporaryTable);
        }
        let rule = matching_rule(&config.rules, database, &relation.schema, &relation.name);
        if let Some(rule) = rule {
            if rule.cache == Some(false) {
                return Err(Reason::RuleDenied);
            }
            if let Some(rule_ttl) = rule.ttl {
                ttl = ttl.min(rule_ttl);
            }
        }
        if relation.row_security && !rule.is_some_and(|r| r.allow_rls) {
            return Err(Reason::RowLevelSecurity);
        }
        match relation.kind {
            b'r' | b'p' | b'm' => {}
            b'S' => return Err(Reason::Sequence),
            b'v' => {
                if relation.view_volatile {
                    return Err(Reason::VolatileView);
                }
                stack.extend(&relation.view_reads);
            }
            _ => return Err(Reason::UnknownTable),
        }
        tables.push(oid);
    }
    tables.sort_unstable();
    Ok(Decision { tables, ttl })
}

/// Constructs that sqlparser reads as function calls but that Postgres
/// evaluates itself: as immutable as their arguments, which are checked.
fn is_syntax(function: &Name) -> bool {
    function.schema.is_none()
        && matches!(
            function.name.as_str(),
            "coalesce" | "nullif" | "greatest" | "least"
        )
}

fn is_listed_immutable(function: &Name, listed: &[String]) -> bool {
    listed.iter().any(|entry| match entry.split_once('.') {
        Some((schema, name)) => function.schema.as_deref() == Some(schema) && function.name == name,
        None => function.name == *entry,
    })
}

fn matching_rule<'a>(
    rules: &'a [CacheRule],
    database: &str,
    schema: &str,
    table: &str,
) -> Option<&'a CacheRule> {
    rules.iter().find(|rule| {
        let database_matches = rule.database.as_deref().is_none_or(|d| d == database);
        let table_matches = rule
            .table
            .as_deref()
            .is_none_or(|t| match t.split_once('.') {
                Some((s, n)) => s == schema && n == table,
                None => t == table,
            });
        database_matches && table_matches
    })
}
