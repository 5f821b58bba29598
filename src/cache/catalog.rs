//! What the cache must know from the catalog of one database: relations
//! (kind, temporary, row-level security, user triggers), how they depend
//! on each other (partitions, inheritance, views, cascading foreign keys),
//! function volatility, and the default search_path. Loaded over a server
//! connection and reloaded after DDL.

use std::collections::hash_map::Entry;

use crate::sql::analyze::Name;
use crate::upstream::{ServerConn, UpstreamError};
use crate::{FastMap, FastSet};

#[derive(Debug, Clone, Default)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    /// pg_class.relkind: r table, p partitioned, v view, m materialized
    /// view, f foreign table, S sequence.
    pub kind: u8,
    pub temporary: bool,
    pub row_security: bool,
    pub user_triggers: bool,
    pub parents: Vec<u32>,
    pub children: Vec<u32>,
    /// For a view: the relations its definition reads.
    pub view_reads: Vec<u32>,
    /// For a view: whether its definition calls a function that is not
    /// immutable.
    pub view_volatile: bool,
    /// Tables whose rows change when rows of this one are deleted or
    /// updated (ON DELETE/UPDATE CASCADE, SET NULL, SET DEFAULT).
    pub cascades_to: Vec<u32>,
}

/// Values by schema and then name: resolving a name on every query looks
/// it up by `&str`, without building an owned key for each schema tried.
#[derive(Debug)]
struct ByQualifiedName<V>(FastMap<String, FastMap<String, V>>);

impl<V> Default for ByQualifiedName<V> {
    fn default() -> Self {
        ByQualifiedName(FastMap::default())
    }
}

impl<V> ByQualifiedName<V> {
    fn get(&self, schema: &str, name: &str) -> Option<&V> {
        self.0.get(schema)?.get(name)
    }

    fn insert(&mut self, schema: String, name: String, value: V) {
        self.0.entry(schema).or_default().insert(name, value);
    }

    fn entry(&mut self, schema: String, name: String) -> Entry<'_, String, V> {
        self.0.entry(schema).or_default().entry(name)
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    pub database_oid: u32,
    /// The search_path a session starts with (`reset_val`).
    pub default_search_path: String,
    by_name: ByQualifiedName<u32>,
    relations: FastMap<u32, Relation>,
    /// Worst volatility per (schema, name) over all overloads: 'i' < 's' < 'v'.
    functions: ByQualifiedName<u8>,
}

/// Schemas whose relations are the catalog itself.
pub const SYSTEM_SCHEMAS: [&str; 3] = ["pg_catalog", "information_schema", "pg_toast"];

fn volatility_rank(v: u8) -> u8 {
    match v {
        b'i' => 0,
        b's' => 1,
        _ => 2,
    }
}

impl Catalog {
    pub async fn load(server: &mut ServerConn) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::default();
        let rows = query(server, "SELECT oid::text, (SELECT reset_val FROM pg_settings WHERE name = 'search_path') FROM pg_database WHERE datname = current_database()").await?;
        let row = rows
            .first()
            .ok_or(CatalogError::Missing("current database"))?;
        catalog.database_oid = parse(&row[0])?;
        catalog.default_search_path = row[1].clone().unwrap_or_default();

        for row in query(server, "SELECT c.oid::text, n.nspname, c.relname, c.relkind::text, (c.relpersistence = 't')::text, c.relrowsecurity::text, EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')").await? {
            let oid: u32 = parse(&row[0])?;
            let relation = Relation {
                schema: text(&row[1]),
                name: text(&row[2]),
                kind: text(&row[3]).bytes().next().unwrap_or(b'r'),
                temporary: text(&row[4]) == "true",
                row_security: text(&row[5]) == "true",
                user_triggers: text(&row[6]) == "true",
                ..Relation::default()
            };
            catalog
                .by_name
                .insert(relation.schema.clone(), relation.name.clone(), oid);
            catalog.relations.insert(oid, relation);
        }
        for row in query(
            server,
            "SELECT inhrelid::text, inhparent::text FROM pg_inherits",
        )
        .await?
        {
            let (child, parent): (u32, u32) = (parse(&row[0])?, parse(&row[1])?);
            if let Some(r) = catalog.relations.get_mut(&child) {
                r.parents.push(parent);
            }
            if let Some(r) = catalog.relations.get_mut(&parent) {
                r.children.push(child);
            }
        }
        for row in query(server, "SELECT DISTINCT r.ev_class::text, d.refobjid::text, (d.refclassid = 'pg_proc'::regclass)::text, coalesce((SELECT p.provolatile::text FROM pg_proc p WHERE p.oid = d.refobjid AND d.refclassid = 'pg_proc'::regclass), '') FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid WHERE d.refobjid <> r.ev_class AND d.refclassid IN ('pg_class'::regclass, 'pg_proc'::regclass)").await? {
            let view: u32 = parse(&row[0])?;
            let referenced: u32 = parse(&row[1])?;
            let is_function = text(&row[2]) == "true";
            let volatility = text(&row[3]).bytes().next().unwrap_or(b'v');
            if let Some(r) = catalog.relations.get_mut(&view) {
                if is_function {
                    r.view_volatile |= volatility != b'i';
                } else if !r.view_reads.contains(&referenced) {
                    r.view_reads.push(referenced);
                }
            }
        }
        for row in query(server, "SELECT confrelid::text, conrelid::text FROM pg_constraint WHERE contype = 'f' AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd'))").await? {
            let (referenced, referencing): (u32, u32) = (parse(&row[0])?, parse(&row[1])?);
            if let Some(r) = catalog.relations.get_mut(&referenced) {
                r.cascades_to.push(referencing);
            }
        }
        for row in query(server, "SELECT n.nspname, p.proname, p.provolatile::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace").await? {
            let v = text(&row[2]).bytes().next().unwrap_or(b'v');
            let entry = catalog
                .functions
                .entry(text(&row[0]), text(&row[1]))
                .or_insert(v);
            if volatility_rank(v) > volatility_rank(*entry) {
                *entry = v;
            }
        }
        Ok(catalog)
    }

    pub fn relation(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// The schemas an unqualified name is looked up in, in order.
    pub fn search_schemas(&self, search_path: &str, role: &str) -> Vec<String> {
        let mut schemas: Vec<String> = search_path
            .split(',')
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                let unquoted = s.trim_matches('"');
                if unquoted == "$user" {
                    role.to_owned()
                } else if s.starts_with('"') {
                    unquoted.to_owned()
                } else {
                    unquoted.to_lowercase()
                }
            })
            .collect();
        // pg_catalog is searched first unless the path places it.
        if !schemas.iter().any(|s| s == "pg_catalog") {
            schemas.insert(0, "pg_catalog".to_owned());
        }
        schemas
    }

    /// Resolves a relation name the way Postgres would for this path.
    pub fn resolve(&self, name: &Name, schemas: &[String]) -> Option<u32> {
        match &name.schema {
            Some(schema) => self.by_name.get(schema, &name.name).copied(),
            None => schemas
                .iter()
                .find_map(|s| self.by_name.get(s, &name.name).copied()),
        }
    }

    /// The worst volatility of a function name as it resolves on this path
    /// (over every overload and, for unqualified names, every schema it
    /// could come from), or `None` if no such function exists.
    pub fn function_volatility(&self, name: &Name, schemas: &[String]) -> Option<u8> {
        let candidates: Vec<&u8> = match &name.schema {
            Some(schema) => self.functions.get(schema, &name.name).into_iter().collect(),
            None => schemas
                .iter()
                .filter_map(|s| self.functions.get(s, &name.name))
                .collect(),
        };
        candidates
            .into_iter()
            .copied()
            .max_by_key(|&v| volatility_rank(v))
    }

    /// Every table whose rows a write to `oid` may change: the table, its
    /// partition ancestors and descendants, tables reached by cascading
    /// foreign keys, and for a view the tables under it. `None` when the
    /// effects cannot be bounded (user triggers).
    pub fn write_closure(&self, oid: u32) -> Option<Vec<u32>> {
        let mut written = FastSet::default();
        let mut affected = FastSet::default();
        let mut stack = vec![oid];
        while let Some(current) = stack.pop() {
            if !written.insert(current) {
                continue;
            }
            affected.insert(current);
            let Some(r) = self.relations.get(&current) else {
                continue;
            };
            if r.user_triggers {
                return None;
            }
            // Rows written here are rows of the descendants written through
            // a parent, of cascade targets, and of a view's base tables.
            stack.extend(&r.children);
            stack.extend(&r.cascades_to);
            stack.extend(&r.view_reads);
            // Readers of an ancestor see these rows too; siblings do not.
            let mut up = r.parents.clone();
            while let Some(parent) = up.pop() {
                if affected.insert(parent) {
                    if let Some(p) = self.relations.get(&parent) {
                        up.extend(&p.parents);
                    }
                }
            }
        }
        Some(affected.into_iter().collect())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("catalog query failed: {0}")]
    Query(String),
    #[error("catalog query returned no {0}")]
    Missing(&'static str),
    #[error("unexpected value in catalog: {0}")]
    Parse(String),
}

async fn query(
    server: &mut ServerConn,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, CatalogError> {
    let result = server.run_internal(sql).await?;
    if let Some((code, message)) = result.error {
        return Err(CatalogError::Query(format!("{code}: {message}")));
    }
    Ok(result.rows)
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn parse<T: std::str::FromStr>(value: &Option<String>) -> Result<T, CatalogError> {
    let text = value.as_deref().unwrap_or("");
    text.parse()
        .map_err(|_| CatalogError::Parse(text.to_owned()))
}
