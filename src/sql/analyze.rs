//! Statement analysis with sqlparser: read or write, the tables read and
//! written, the functions called, and the reasons a read may not be cached.
//!
//! Everything here comes from the text alone; what depends on the catalog
//! (is this function immutable, is this table temporary) is decided in
//! `cache::policy` with this analysis as input.

use std::ops::ControlFlow;
use std::time::Duration;

use sqlparser::ast::{
    AlterTableOperation, CopySource, Expr, FromTable, ObjectName, ObjectNamePart, ObjectType,
    Query, SetExpr, Statement, TableFactor, TableObject, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// A relation or function name as written, normalised the way Postgres
/// folds identifiers (unquoted → lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name {
    pub schema: Option<String>,
    pub name: String,
}

impl Name {
    fn from_object(object: &ObjectName) -> Option<Name> {
        let parts: Vec<String> = object
            .0
            .iter()
            .map(|part| match part {
                ObjectNamePart::Identifier(ident) => Some(if ident.quote_style.is_some() {
                    ident.value.clone()
                } else {
                    ident.value.to_lowercase()
                }),
                _ => None,
            })
            .collect::<Option<_>>()?;
        match parts.as_slice() {
            [name] => Some(Name {
                schema: None,
                name: name.clone(),
            }),
            [schema, name] => Some(Name {
                schema: Some(schema.clone()),
                name: name.clone(),
            }),
            // database.schema.name: the database is the current one.
            [_, schema, name] => Some(Name {
                schema: Some(schema.clone()),
                name: name.clone(),
            }),
            _ => None,
        }
    }
}

/// What kind of statement this is, as far as caching and pooling care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A query that only reads (it may still be uncacheable).
    Read,
    /// Changes rows of the tables in `writes`.
    Write,
    /// Changes the schema, privileges or policies: everything cached for the
    /// database may be wrong.
    Ddl,
    Transaction,
    /// Session state (SET, SHOW, DISCARD, ...), no effect on data.
    Session,
    /// No effect on data or cached results (VACUUM, CREATE INDEX, ...).
    Harmless,
    /// Effects cannot be known from the text (CALL, DO, EXECUTE, text that
    /// does not parse): treated as writing anything.
    Unknown,
}

/// Why a statement is not served from or stored in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    NotRead,
    Unparsed,
    MultiStatement,
    Locking,
    VolatileLiteral,
    Sampling,
    Hint,
    UnknownFunction,
    VolatileFunction,
    UnknownTable,
    TemporaryTable,
    SystemCatalog,
    Sequence,
    RowLevelSecurity,
    VolatileView,
    CteShadowsTable,
    RuleDenied,
    InTransaction,
    SessionState,
    Disabled,
    RowLimit,
    TooLarge,
    NotCaptured,
    CatalogUnavailable,
    SharedTierDown,
}

impl Reason {
    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotRead => "not_read",
            Reason::Unparsed => "unparsed",
            Reason::MultiStatement => "multi_statement",
            Reason::Locking => "locking_clause",
            Reason::VolatileLiteral => "volatile_literal",
            Reason::Sampling => "tablesample",
            Reason::Hint => "hint_nocache",
            Reason::UnknownFunction => "unknown_function",
            Reason::VolatileFunction => "volatile_function",
            Reason::UnknownTable => "unknown_table",
            Reason::TemporaryTable => "temporary_table",
            Reason::SystemCatalog => "system_catalog",
            Reason::Sequence => "sequence",
            Reason::RowLevelSecurity => "row_level_security",
            Reason::VolatileView => "volatile_view",
            Reason::CteShadowsTable => "cte_shadows_table",
            Reason::RuleDenied => "rule_denied",
            Reason::InTransaction => "in_transaction",
            Reason::SessionState => "session_state",
            Reason::Disabled => "disabled",
            Reason::RowLimit => "row_limit",
            Reason::TooLarge => "too_large",
            Reason::NotCaptured => "not_captured",
            Reason::CatalogUnavailable => "catalog_unavailable",
            Reason::SharedTierDown => "shared_tier_down",
        }
    }
}

/// Per-query instructions in a `/* pgstash:... */` comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    pub nocache: bool,
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Analysis {
    pub class: Class,
    pub reads: Vec<Name>,
    pub writes: Vec<Name>,
    pub functions: Vec<Name>,
    pub cte_names: Vec<String>,
    /// Set when the text alone rules caching out.
    pub not_cacheable: Option<Reason>,
    /// Whether a COMMIT/ROLLBACK/BEGIN is among the statements.
    pub transaction_control: bool,
    pub hints: Hints,
}

impl Analysis {
    fn new(class: Class) -> Analysis {
        Analysis {
            class,
            reads: Vec::new(),
            writes: Vec::new(),
            functions: Vec::new(),
            cte_names: Vec::new(),
            not_cacheable: None,
            transaction_control: false,
            hints: Hints::default(),
        }
    }

    /// A statement pgstash knows nothing about: it may write anything.
    pub fn unknown() -> Analysis {
        let mut a = Analysis::new(Class::Unknown);
        a.not_cacheable = Some(Reason::Unparsed);
        a
    }

    pub fn is_cacheable_candidate(&self) -> bool {
        self.class == Class::Read && self.not_cacheable.is_none()
    }
}

/// Analyses one query string (one or more statements).
pub fn analyze(sql: &str) -> Analysis {
    let hints = parse_hints(sql);
    let mut analysis = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => analyze_statements(&statements),
        Err(_) => {
            let mut a = Analysis::new(Class::Unknown);
            a.not_cacheable = Some(Reason::Unparsed);
            a
        }
    };
    if hints.nocache && analysis.not_cacheable.is_none() {
        analysis.not_cacheable = Some(Reason::Hint);
    }
    analysis.hints = hints;
    analysis
}

fn analyze_statements(statements: &[Statement]) -> Analysis {
    let mut analysis = Analysis::new(Class::Harmless);
    if statements.is_empty() {
        analysis.not_cacheable = Some(Reason::NotRead);
        return analysis;
    }
    for statement in statements {
        let class = classify(statement, &mut analysis);
        analysis.class = combine(analysis.class, class);
    }
    let mut collector = Collector::default();
    for statement in statements {
        let _ = statement.visit(&mut collector);
    }
    analysis.reads = collector.relations;
    analysis.functions = collector.functions;
    analysis.cte_names = collector.cte_names;
    analysis.writes.extend(collector.writes);
    analysis.writes.sort();
    analysis.writes.dedup();
    if collector.nested_write && analysis.class == Class::Read {
        analysis.class = Class::Write;
    }
    analysis.not_cacheable = if analysis.class != Class::Read {
        Some(Reason::NotRead)
    } else if statements.len() > 1 {
        Some(Reason::MultiStatement)
    } else {
        collector.not_cacheable
    };
    analysis
}

/// The stronger of two classes when a string holds several statements.
fn combine(a: Class, b: Class) -> Class {
    fn rank(c: Class) -> u8 {
        match c {
            Class::Harmless => 0,
            Class::Session => 1,
            Class::Transaction => 2,
            Class::Read => 3,
            Class::Write => 4,
            Class::Ddl => 5,
            Class::Unknown => 6,
        }
    }
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

fn classify(statement: &Statement, analysis: &mut Analysis) -> Class {
    match statement {
        Statement::Query(query) => {
            if select_into(query) {
                Class::Ddl
            } else {
                Class::Read
            }
        }
        Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Truncate(_)
        | Statement::RefreshMaterializedView(_) => Class::Write,
        Statement::Copy { source, to, .. } => match (source, to) {
            (CopySource::Table { table_name, .. }, false) => {
                analysis.writes.extend(Name::from_object(table_name));
                Class::Write
            }
            _ => Class::Read,
        },
        Statement::Explain {
            analyze, statement, ..
        } => {
            if *analyze {
                // EXPLAIN ANALYZE runs the statement.
                combine(Class::Read, classify(statement, analysis))
            } else {
                Class::Harmless
            }
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => {
            analysis.transaction_control = true;
            Class::Transaction
        }
        Statement::Set(_)
        | Statement::ShowVariable { .. }
        | Statement::Discard { .. }
        | Statement::Deallocate { .. }
        | Statement::Prepare { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. }
        | Statement::NOTIFY { .. } => Class::Session,
        Statement::CreateIndex(_)
        | Statement::Vacuum(_)
        | Statement::Analyze(_)
        | Statement::Comment { .. }
        | Statement::Lock(_) => Class::Harmless,
        Statement::CreateTable(create) if create.temporary => Class::Harmless,
        Statement::Drop {
            object_type: ObjectType::Index,
            ..
        } => Class::Harmless,
        Statement::AlterTable(alter)
            if alter.operations.iter().all(|op| {
                !matches!(
                    op,
                    AlterTableOperation::EnableRowLevelSecurity
                        | AlterTableOperation::DisableRowLevelSecurity
                        | AlterTableOperation::ForceRowLevelSecurity
                        | AlterTableOperation::NoForceRowLevelSecurity
                )
            }) =>
        {
            Class::Ddl
        }
        Statement::Call(_) | Statement::Execute { .. } => Class::Unknown,
        // Every other statement that parses is DDL of some kind (CREATE,
        // ALTER, DROP, GRANT, REVOKE, policies, roles, ...).
        _ => Class::Ddl,
    }
}

fn select_into(query: &Query) -> bool {
    match query.body.as_ref() {
        SetExpr::Select(select) => select.into.is_some(),
        _ => false,
    }
}

/// Walks the AST collecting relations read, write targets and functions.
#[derive(Default)]
struct Collector {
    relations: Vec<Name>,
    writes: Vec<Name>,
    functions: Vec<Name>,
    cte_names: Vec<String>,
    nested_write: bool,
    not_cacheable: Option<Reason>,
}

impl Collector {
    fn refuse(&mut self, reason: Reason) {
        self.not_cacheable.get_or_insert(reason);
    }

    fn write_target(&mut self, factor: &TableFactor) {
        if let TableFactor::Table { name, .. } = factor {
            self.writes.extend(Name::from_object(name));
        }
    }
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            self.refuse(Reason::Locking);
        }
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                let alias = &cte.alias.name;
                self.cte_names.push(if alias.quote_style.is_some() {
                    alias.value.clone()
                } else {
                    alias.value.to_lowercase()
                });
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name, args, sample, ..
        } = factor
        {
            if sample.is_some() {
                self.refuse(Reason::Sampling);
            }
            match (args, Name::from_object(name)) {
                (Some(_), Some(function)) => self.functions.push(function),
                (None, Some(relation)) => self.relations.push(relation),
                (_, None) => self.refuse(Reason::UnknownTable),
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        // Table factors are handled above (they know table functions from
        // tables); other relation mentions (INSERT targets and the like) are
        // recorded here.
        if let Some(name) = Name::from_object(relation) {
            if !self.relations.contains(&name) && !self.functions.contains(&name) {
                self.relations.push(name);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(function) => match Name::from_object(&function.name) {
                Some(name) => self.functions.push(name),
                None => self.refuse(Reason::UnknownFunction),
            },
            Expr::Cast {
                expr, data_type, ..
            } => {
                if let Expr::Value(value) = expr.as_ref() {
                    if is_temporal(&data_type.to_string()) && is_volatile_literal(&value.value) {
                        self.refuse(Reason::VolatileLiteral);
                    }
                }
            }
            Expr::TypedString(typed)
                if is_temporal(&typed.data_type.to_string())
                    && is_volatile_literal(&typed.value.value) =>
            {
                self.refuse(Reason::VolatileLiteral);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        let is_write = match statement {
            Statement::Insert(insert) => {
                if let TableObject::TableName(name) = &insert.table {
                    self.writes.extend(Name::from_object(name));
                }
                true
            }
            Statement::Update(update) => {
                self.write_target(&update.table.relation);
                true
            }
            Statement::Delete(delete) => {
                let (FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables)) =
                    &delete.from;
                for table in tables {
                    self.write_target(&table.relation);
                }
                for name in &delete.tables {
                    self.writes.extend(Name::from_object(name));
                }
                true
            }
            Statement::Merge(merge) => {
                self.write_target(&merge.table);
                true
            }
            Statement::Truncate(truncate) => {
                for target in &truncate.table_names {
                    self.writes.extend(Name::from_object(&target.name));
                }
                true
            }
            Statement::RefreshMaterializedView(refresh) => {
                self.writes.extend(Name::from_object(&refresh.name));
                true
            }
            _ => false,
        };
        self.nested_write |= is_write;
        ControlFlow::Continue(())
    }
}

fn is_temporal(type_name: &str) -> bool {
    let lowered = type_name.to_ascii_lowercase();
    lowered.contains("time") || lowered.contains("date")
}

/// Date/time input strings whose value is taken when the statement runs.
fn is_volatile_literal(value: &Value) -> bool {
    let text = match value {
        Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => s,
        _ => return false,
    };
    let lowered = text.trim().to_ascii_lowercase();
    ["now", "today", "tomorrow", "yesterday"]
        .iter()
        .any(|special| lowered.contains(special))
}

/// Reads `/* pgstash:nocache */` and `/* pgstash:ttl=30s */` (several
/// directives may share a comment, separated by spaces or commas).
pub fn parse_hints(sql: &str) -> Hints {
    let mut hints = Hints::default();
    let mut rest = sql;
    while let Some(start) = rest.find("/*") {
        let Some(len) = rest[start + 2..].find("*/") else {
            break;
        };
        let body = rest[start + 2..start + 2 + len].trim();
        if let Some(directives) = body.strip_prefix("pgstash:") {
            for directive in directives.split([' ', ',']).filter(|d| !d.is_empty()) {
                if directive.eq_ignore_ascii_case("nocache") {
                    hints.nocache = true;
                } else if let Some(ttl) = directive.strip_prefix("ttl=") {
                    hints.ttl = humantime::parse_duration(ttl).ok();
                }
            }
        }
        rest = &rest[start + 2 + len + 2..];
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        match s.split_once('.') {
            Some((schema, n)) => Name {
                schema: Some(schema.into()),
                name: n.into(),
            },
            None => Name {
                schema: None,
                name: s.into(),
            },
        }
    }

    #[test]
    fn plain_select_is_a_cacheable_candidate() {
        let a = analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 5");
        assert!(a.is_cacheable_candidate());
        assert_eq!(a.reads, vec![name("pgbench_accounts")]);
        let a = analyze("select * from S.T join u on true, generate_series(1, 3) g");
        assert_eq!(a.reads, vec![name("s.t"), name("u")]);
        assert_eq!(a.functions, vec![name("generate_series")]);
    }

    #[test]
    fn writes_name_their_targets() {
        let cases = [
            (
                "INSERT INTO a VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2",
                "a",
            ),
            ("UPDATE b SET v = 1 FROM c WHERE b.id = c.id", "b"),
            ("DELETE FROM d USING e WHERE d.id = e.id", "d"),
            (
                "MERGE INTO f USING g ON f.id = g.id WHEN MATCHED THEN DELETE",
                "f",
            ),
            ("TRUNCATE h", "h"),
            ("COPY i FROM STDIN", "i"),
            ("REFRESH MATERIALIZED VIEW j", "j"),
            ("WITH x AS (DELETE FROM k RETURNING *) SELECT * FROM x", "k"),
        ];
        for (sql, target) in cases {
            let a = analyze(sql);
            assert_eq!(a.class, Class::Write, "{sql}");
            assert!(a.writes.contains(&name(target)), "{sql}: {:?}", a.writes);
            assert!(!a.is_cacheable_candidate(), "{sql}");
        }
    }

    #[test]
    fn uncacheable_reads_say_why() {
        assert_eq!(
            analyze("SELECT * FROM t FOR UPDATE").not_cacheable,
            Some(Reason::Locking)
        );
        assert_eq!(
            analyze("SELECT 'now'::timestamptz").not_cacheable,
            Some(Reason::VolatileLiteral)
        );
        assert_eq!(
            analyze("SELECT 1; SELECT 2").not_cacheable,
            Some(Reason::MultiStatement)
        );
        assert_eq!(analyze("SELEKT 1").not_cacheable, Some(Reason::Unparsed));
        assert_eq!(
            analyze("/* pgstash:nocache */ SELECT 1").not_cacheable,
            Some(Reason::Hint)
        );
        assert_eq!(analyze("SELECT * INTO t2 FROM t").class, Class::Ddl);
    }

    #[test]
    fn classes_of_other_statements() {
        assert_eq!(analyze("GRANT SELECT ON t TO bob").class, Class::Ddl);
        assert_eq!(
            analyze("ALTER TABLE t ENABLE ROW LEVEL SECURITY").class,
            Class::Ddl
        );
        assert_eq!(analyze("CALL p()").class, Class::Unknown);
        assert_eq!(analyze("DO $$ BEGIN END $$").class, Class::Unknown);
        assert_eq!(analyze("BEGIN").class, Class::Transaction);
        assert_eq!(analyze("SET x.y = 1").class, Class::Session);
        assert_eq!(analyze("CREATE INDEX ON t (a)").class, Class::Harmless);
        assert_eq!(analyze("EXPLAIN ANALYZE DELETE FROM t").class, Class::Write);
    }

    #[test]
    fn hints_are_read() {
        let h = parse_hints("SELECT 1 /* pgstash:ttl=30s */");
        assert_eq!(h.ttl, Some(Duration::from_secs(30)));
        assert!(!h.nocache);
        assert!(parse_hints("/* pgstash:nocache, ttl=1s */ SELECT 1").nocache);
    }
}
