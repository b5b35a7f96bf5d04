//! `ReplicaSafety`: whether a statement text may run on a streaming replica (a hot standby).
//!
//! Reads can be spread over a shard's replicas, but a hot standby refuses every write, and
//! some reads only mean something on the primary (the session's sequence values, advisory
//! locks, the current transaction id). The answer comes from the parse tree alone, without
//! a catalog round trip, so it is part of the cached `Analysis`: a text may run on a
//! replica only when every statement in it is a `SELECT` (also `VALUES`, `TABLE`), a `SHOW`,
//! or an `EXPLAIN` without `ANALYZE` of such a `SELECT`, with no row lock, no `INTO`, no
//! data-modifying WITH query, and no call to a function that writes, locks, has side
//! effects or reads primary-only state. Functions that are not PostgreSQL built-ins may do
//! anything, so they are listed for the caller, who may know them to be read-only.
//!
//! What the text does not show is not seen: a view, rule, trigger, operator or cast that
//! calls a writing function; a user-defined function overloading a built-in's name (taken
//! for the built-in); a temporary table named without `pg_temp`; an unlogged table. A
//! standby answers those with an error (a read-only transaction cannot write, and it cannot
//! read unlogged or temporary tables); it never writes.

use std::sync::OnceLock;

use pg_query::protobuf::a_const::Val;
use pg_query::protobuf::{ExplainStmt, RawStmt, SelectStmt, TransactionStmtKind};
use pg_query::{Node, NodeEnum};

use crate::tree_scan::TreeScan;

/// Whether a statement text may run on a streaming replica instead of the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaSafety {
    /// Every statement only reads, and reads nothing a replica answers differently than the
    /// primary (apart from replication lag).
    Safe,
    /// Safe if these functions, which are not PostgreSQL built-ins, are read-only: the
    /// names as called, dot-joined (`my_func`, `app.report`; quoted names keep their case),
    /// sorted, without duplicates, never empty.
    IfReadOnly(Vec<String>),
    /// Must run on the primary: it writes, locks rows, calls a function that writes or
    /// reads primary-only state, controls transactions or the session, or was not parsed.
    Primary,
}

impl ReplicaSafety {
    /// Whether the text may run on a replica when the functions in `read_only_functions`
    /// are known to be read-only. Names match exactly as [`ReplicaSafety::IfReadOnly`]
    /// lists them: `my_func` does not cover a call to `app.my_func`, nor the reverse. Only
    /// non-built-in functions can be declared read-only: the built-ins (and extension
    /// functions) known to write, lock or read primary-only state, such as `nextval` or
    /// `pg_advisory_lock`, always make a text [`ReplicaSafety::Primary`].
    pub fn allows<S: AsRef<str>>(&self, read_only_functions: &[S]) -> bool {
        match self {
            ReplicaSafety::Safe => true,
            ReplicaSafety::IfReadOnly(functions) => functions.iter().all(|function| {
                read_only_functions
                    .iter()
                    .any(|declared| declared.as_ref() == function)
            }),
            ReplicaSafety::Primary => false,
        }
    }
}

/// The replica safety of a parsed text: every statement must be safe, and an empty text
/// (only comments or semicolons) gains nothing from a replica.
pub(crate) fn classify(statements: &[RawStmt]) -> ReplicaSafety {
    let mut functions = Vec::new();
    for raw in statements {
        let node = raw.stmt.as_ref().and_then(|stmt| stmt.node.as_ref());
        if !node.is_some_and(|node| statement(node, &mut functions)) {
            return ReplicaSafety::Primary;
        }
    }
    if statements.is_empty() {
        return ReplicaSafety::Primary;
    }
    functions.sort_unstable();
    functions.dedup();
    if functions.is_empty() {
        ReplicaSafety::Safe
    } else {
        ReplicaSafety::IfReadOnly(functions)
    }
}

/// Whether one statement may run on a replica, adding the non-built-in functions it calls
/// to `functions`.
fn statement(node: &NodeEnum, functions: &mut Vec<String>) -> bool {
    match node {
        NodeEnum::SelectStmt(select) => query(select, functions),
        NodeEnum::VariableShowStmt(_) => true,
        NodeEnum::ExplainStmt(explain) => explained(explain, functions),
        _ => false,
    }
}

/// `EXPLAIN` of a safe `SELECT` only plans it. `EXPLAIN ANALYZE` runs it, and whoever asks
/// for the timings wants the primary's, so it stays there (even as `ANALYZE false`).
fn explained(explain: &ExplainStmt, functions: &mut Vec<String>) -> bool {
    let analyze = explain.options.iter().any(|option| {
        matches!(option.node.as_ref(), Some(NodeEnum::DefElem(d)) if d.defname == "analyze")
    });
    match explain
        .query
        .as_deref()
        .and_then(|query| query.node.as_ref())
    {
        Some(NodeEnum::SelectStmt(select)) if !analyze => query(select, functions),
        _ => false,
    }
}

/// A `SELECT`, `VALUES` or `TABLE` statement, scanned whole: row locks, `INTO` and
/// data-modifying WITH queries may sit at any level.
fn query(select: &SelectStmt, functions: &mut Vec<String>) -> bool {
    let mut scan = TreeScan::default();
    if scan.scan(select).is_err() || scan.locks_rows || scan.into || scan.modifies {
        return false;
    }
    // Temporary tables live in one session of the primary.
    if scan
        .relations
        .iter()
        .any(|(schema, _)| schema.starts_with("pg_temp"))
    {
        return false;
    }
    for name in &scan.functions {
        match call(name) {
            Call::BuiltIn => {}
            Call::Primary => return false,
            Call::User(name) => functions.push(name),
        }
    }
    true
}

/// What a function call means for replica safety.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    /// A built-in that a replica answers like the primary.
    BuiltIn,
    /// Writes, locks, has side effects or reads primary-only state.
    Primary,
    /// Not a built-in: may do anything. The dot-joined name.
    User(String),
}

/// Classifies a call by its name parts (`["pg_catalog", "lower"]`). Unqualified names are
/// taken to resolve in `pg_catalog`, which the search path puts first unless told
/// otherwise.
fn call(parts: &[String]) -> Call {
    let Some((name, schema)) = parts.split_last() else {
        return Call::Primary; // the grammar never makes one; stay on the safe side
    };
    let in_catalog = match schema {
        [] => true,
        [schema] => schema == "pg_catalog",
        _ => false,
    };
    if in_catalog && is_primary_only(name) {
        Call::Primary
    } else if in_catalog && is_builtin(name) {
        Call::BuiltIn
    } else {
        Call::User(parts.join("."))
    }
}

/// Built-in (and common extension) functions that write, take locks, change or read state
/// that exists only on the primary or in one session, control the server, or fail during
/// recovery. Exact names; see also [`PRIMARY_ONLY_PREFIXES`].
const PRIMARY_ONLY: &[&str] = &[
    // sequences; currval and lastval read the session's own nextval
    "nextval",
    "setval",
    "currval",
    "lastval",
    // transaction ids: reading one assigns it
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    // session state
    "set_config",
    "setseed",
    "pg_notify",
    "pg_export_snapshot",
    // large objects without the lo_ prefix
    "loread",
    "lowrite",
    // server control
    "pg_switch_wal",
    "pg_promote",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_rotate_logfile_old",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_log_backend_memory_contexts",
    "pg_backup_start",
    "pg_backup_stop",
    // writes
    "pg_logical_emit_message",
    "pg_import_system_collations",
    "pg_replication_slot_advance",
    "pg_nextoid",
    "pg_extension_config_dump",
    "pg_stop_making_pinned_objects",
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
];

/// Name prefixes of function families like those in [`PRIMARY_ONLY`].
const PRIMARY_ONLY_PREFIXES: &[&str] = &[
    "pg_advisory_",
    "pg_try_advisory_",
    "lo_",
    "pg_create_", // replication slots, restore points
    "pg_drop_",
    "pg_copy_", // replication slots
    "pg_logical_slot_",
    "pg_replication_origin_",
    "pg_stat_reset",
    "pg_current_wal_", // fails during recovery
    "pg_walfile_name", // fails during recovery
    "pg_wal_replay_",
    "binary_upgrade_",
    "cursor_to_xml", // reads a cursor of the session
    "dblink",        // the dblink extension: arbitrary remote statements
];

fn is_primary_only(name: &str) -> bool {
    PRIMARY_ONLY.contains(&name)
        || PRIMARY_ONLY_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The names of PostgreSQL's built-in functions, generated from a PostgreSQL 15 catalog
/// (how: see the file's header).
const BUILTIN_FUNCTIONS: &str = include_str!("builtin_functions.txt");

fn is_builtin(name: &str) -> bool {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut names: Vec<&str> = BUILTIN_FUNCTIONS
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();
        names.sort_unstable();
        names
    });
    names.binary_search(&name).is_ok()
}

/// Whether `sql` is exactly one `BEGIN` or `START TRANSACTION` whose options include
/// `READ ONLY` and not `READ WRITE`: such a transaction may run on a replica. `ISOLATION
/// LEVEL SERIALIZABLE` does not qualify, since a hot standby refuses it.
pub fn begin_read_only(sql: &str) -> bool {
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return false;
    };
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return false;
    };
    let Some(NodeEnum::TransactionStmt(begin)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref())
    else {
        return false;
    };
    if !matches!(
        begin.kind(),
        TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart
    ) {
        return false;
    }
    let mut read_only = false;
    for option in &begin.options {
        let Some(NodeEnum::DefElem(option)) = option.node.as_ref() else {
            return false;
        };
        let arg = option.arg.as_deref();
        match option.defname.as_str() {
            // READ ONLY is 1, READ WRITE is 0 (gram.y, transaction_mode_item).
            "transaction_read_only" if const_int(arg) == Some(1) => read_only = true,
            "transaction_read_only" => return false,
            "transaction_isolation" if const_str(arg) == Some("serializable") => return false,
            _ => {}
        }
    }
    read_only
}

fn const_int(node: Option<&Node>) -> Option<i32> {
    match node?.node.as_ref()? {
        NodeEnum::AConst(c) => match c.val.as_ref()? {
            Val::Ival(i) => Some(i.ival),
            _ => None,
        },
        _ => None,
    }
}

fn const_str(node: Option<&Node>) -> Option<&str> {
    match node?.node.as_ref()? {
        NodeEnum::AConst(c) => match c.val.as_ref()? {
            Val::Sval(s) => Some(s.sval.as_str()),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyse;
    use crate::shard_map::ShardMap;

    fn safety(sql: &str) -> ReplicaSafety {
        analyse(sql, &ShardMap::default())
            .expect("analyses")
            .replica
    }

    fn only(names: &[&str]) -> ReplicaSafety {
        ReplicaSafety::IfReadOnly(names.iter().map(|name| name.to_string()).collect())
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn statements_that_may_run_on_a_replica() {
        use ReplicaSafety::{Primary, Safe};
        let cases = [
            ("SELECT * FROM t WHERE id = 1", Safe),
            ("SELECT count(*) FROM t", Safe),
            ("SELECT now(), random(), lower('A')", Safe),
            ("SELECT pg_catalog.lower('A')", Safe),
            ("SELECT extract(year FROM now()), substring('abc' FROM 2), trim(' a ')", Safe),
            ("SHOW search_path", Safe),
            ("SHOW ALL", Safe),
            ("VALUES (1), (2)", Safe),
            ("TABLE t", Safe),
            ("SELECT 1; SELECT 2", Safe),
            ("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1 LIMIT 3", Safe),
            ("WITH x AS (SELECT * FROM t) SELECT * FROM x", Safe),
            ("SELECT * FROM generate_series(1, 3) AS g JOIN t ON t.id = g", Safe),
            ("SELECT '/* nextval(1) */', 'nextval(''s'')'", Safe),
            ("EXPLAIN SELECT * FROM t", Safe),
            ("EXPLAIN (COSTS off, VERBOSE) SELECT * FROM t", Safe),
            ("/* shardline: primary */ SELECT 1", Safe),
            // row locks, anywhere
            ("SELECT * FROM t FOR UPDATE", Primary),
            ("SELECT * FROM t FOR NO KEY UPDATE", Primary),
            ("SELECT * FROM t FOR SHARE SKIP LOCKED", Primary),
            ("SELECT * FROM t FOR KEY SHARE OF t", Primary),
            ("SELECT * FROM (SELECT * FROM t FOR SHARE) s", Primary),
            ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", Primary),
            ("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x", Primary),
            ("SELECT 1 UNION SELECT id FROM (SELECT id FROM t FOR UPDATE) s", Primary),
            // writes inside a read
            ("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x", Primary),
            ("WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT 1", Primary),
            ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT 1", Primary),
            ("WITH y AS (SELECT 1), x AS (WITH z AS (DELETE FROM t RETURNING 1) SELECT * FROM z) SELECT * FROM x", Primary),
            ("SELECT * INTO t2 FROM t", Primary),
            ("SELECT * FROM pg_temp.scratch", Primary),
            // functions that write, lock or read primary-only state
            ("SELECT nextval('s')", Primary),
            ("SELECT pg_catalog.nextval('s')", Primary),
            ("SELECT currval('s'), lastval()", Primary),
            ("SELECT setval('s', 1)", Primary),
            ("SELECT pg_advisory_lock(1)", Primary),
            ("SELECT pg_try_advisory_xact_lock(1)", Primary),
            ("SELECT * FROM t WHERE pg_try_advisory_lock(id)", Primary),
            ("SELECT id FROM t ORDER BY id LIMIT nextval('s')", Primary),
            ("SELECT count(*) FILTER (WHERE pg_advisory_lock(1) IS NULL) FROM t", Primary),
            ("SELECT pg_notify('c', 'x')", Primary),
            ("SELECT txid_current()", Primary),
            ("SELECT pg_current_xact_id_if_assigned()", Primary),
            ("SELECT set_config('a.b', 'c', false)", Primary),
            ("SELECT lo_import('/tmp/x')", Primary),
            ("SELECT pg_create_restore_point('x')", Primary),
            ("SELECT pg_drop_replication_slot('x')", Primary),
            ("SELECT pg_switch_wal()", Primary),
            ("SELECT pg_terminate_backend(1)", Primary),
            ("SELECT pg_stat_reset()", Primary),
            ("SELECT pg_replication_origin_create('x')", Primary),
            ("SELECT pg_logical_emit_message(true, 'p', 'm')", Primary),
            ("SELECT dblink_exec('conn', 'DELETE FROM t')", Primary),
            ("SELECT * FROM dblink('conn', 'SELECT 1') AS d(a int)", Primary),
            ("VALUES (nextval('s'))", Primary),
            ("EXPLAIN SELECT nextval('s')", Primary),
            // everything else
            ("SELECT 1; UPDATE t SET a = 1", Primary),
            ("UPDATE t SET a = 1", Primary),
            ("INSERT INTO t VALUES (1)", Primary),
            ("DELETE FROM t", Primary),
            ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", Primary),
            ("COPY t TO STDOUT", Primary),
            ("CREATE TABLE t2 (a int)", Primary),
            ("CREATE TABLE t2 AS SELECT 1", Primary),
            ("LOCK TABLE t", Primary),
            ("CALL p()", Primary),
            ("DO $$ BEGIN END $$", Primary),
            ("BEGIN", Primary),
            ("BEGIN READ ONLY", Primary),
            ("COMMIT", Primary),
            ("SET x = 1", Primary),
            ("PREPARE q AS SELECT 1", Primary),
            ("EXECUTE q", Primary),
            ("DECLARE c CURSOR FOR SELECT 1", Primary),
            ("LISTEN c", Primary),
            ("NOTIFY c", Primary),
            ("EXPLAIN ANALYZE SELECT 1", Primary),
            ("EXPLAIN (ANALYZE false) SELECT 1", Primary),
            ("EXPLAIN DELETE FROM t", Primary),
            ("EXPLAIN ANALYZE DELETE FROM t", Primary),
            ("SELEC 1", Primary),
            ("", Primary),
            ("-- nothing", Primary),
        ];
        for (sql, want) in cases {
            assert_eq!(safety(sql), want, "{sql}");
        }
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn user_functions_are_listed_for_the_caller() {
        let cases = [
            ("SELECT my_func(1)", only(&["my_func"])),
            ("SELECT app.my_func(1)", only(&["app.my_func"])),
            ("SELECT public.lower('A')", only(&["public.lower"])),
            ("SELECT \"MyFunc\"()", only(&["MyFunc"])),
            ("SELECT b(), a(lower(x)), b() FROM t WHERE c(x)", only(&["a", "b", "c"])),
            ("SELECT * FROM t WHERE id IN (SELECT f(id) FROM u)", only(&["f"])),
            ("SELECT * FROM report_rows(1)", only(&["report_rows"])),
            ("SELECT 1; SELECT g()", only(&["g"])),
            ("SELECT my_func(nextval('s'))", ReplicaSafety::Primary),
            ("SELECT my_func(1) FROM t FOR UPDATE", ReplicaSafety::Primary),
        ];
        for (sql, want) in cases {
            assert_eq!(safety(sql), want, "{sql}");
        }
    }

    #[test]
    fn declared_functions_make_a_text_replica_safe() {
        // Arrange
        let declared = vec!["my_read_fn".to_string(), "app.report".to_string()];
        let analysis = |sql: &str| analyse(sql, &ShardMap::default()).expect("analyses");

        // Act, check
        for (sql, bare, with_declared) in [
            ("SELECT 1", true, true),
            ("SELECT my_read_fn(1)", false, true),
            ("SELECT app.report()", false, true),
            ("SELECT my_read_fn(1), app.report()", false, true),
            ("SELECT report()", false, false),
            ("SELECT other.my_read_fn(1)", false, false),
            ("SELECT my_read_fn(1), other(2)", false, false),
            ("SELECT my_read_fn(nextval('s'))", false, false),
            ("UPDATE t SET a = my_read_fn(1)", false, false),
        ] {
            let analysis = analysis(sql);
            assert_eq!(analysis.replica_safe(), bare, "{sql}");
            assert_eq!(
                analysis.replica_safe_with(&declared),
                with_declared,
                "{sql}"
            );
        }
    }

    #[test]
    fn written_functions_cannot_be_declared_read_only() {
        let analysis = analyse("SELECT nextval('s')", &ShardMap::default()).expect("analyses");

        assert!(!analysis.replica_safe_with(&["nextval", "pg_catalog.nextval"]));
    }

    #[test]
    fn read_only_transactions() {
        for (sql, want) in [
            ("BEGIN READ ONLY", true),
            ("begin read only;", true),
            ("START TRANSACTION READ ONLY", true),
            (
                "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                true,
            ),
            (
                "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY DEFERRABLE",
                true,
            ),
            ("BEGIN", false),
            ("BEGIN READ WRITE", false),
            ("START TRANSACTION", false),
            ("BEGIN READ ONLY, READ WRITE", false),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY", false),
            ("BEGIN READ ONLY; SELECT 1", false),
            ("SET TRANSACTION READ ONLY", false),
            ("COMMIT", false),
            ("SELECT 1", false),
            ("BEGIN READ ONLY ONLY", false),
        ] {
            assert_eq!(begin_read_only(sql), want, "{sql}");
        }
    }

    #[test]
    fn builtin_list_is_sorted_unique_and_complete_enough() {
        let names: Vec<&str> = BUILTIN_FUNCTIONS
            .lines()
            .filter(|line| !line.starts_with('#'))
            .collect();
        assert!(names.len() > 2000, "{} names", names.len());
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        for name in ["lower", "now", "count", "nextval", "jsonb_build_object"] {
            assert!(is_builtin(name), "{name}");
        }
        for name in ["my_func", "LOWER", ""] {
            assert!(!is_builtin(name), "{name:?}");
        }
    }

    #[test]
    fn calls_by_name() {
        let parts = |name: &str| name.split('.').map(str::to_owned).collect::<Vec<_>>();
        let user = |name: &str| Call::User(name.to_owned());
        for (name, want) in [
            ("lower", Call::BuiltIn),
            ("pg_catalog.lower", Call::BuiltIn),
            ("public.lower", user("public.lower")),
            ("db.pg_catalog.lower", user("db.pg_catalog.lower")),
            ("nextval", Call::Primary),
            ("pg_catalog.nextval", Call::Primary),
            ("pg_try_advisory_xact_lock", Call::Primary),
            ("lo_import", Call::Primary),
            ("dblink_exec", Call::Primary),
            ("pg_stat_reset_shared", Call::Primary),
            ("app.nextval", user("app.nextval")),
            ("my_func", user("my_func")),
        ] {
            assert_eq!(call(&parts(name)), want, "{name}");
        }
        assert_eq!(call(&[]), Call::Primary);
    }

    #[test]
    fn allows_declared_functions_only() {
        let safety = ReplicaSafety::IfReadOnly(vec!["app.report".into(), "my_fn".into()]);

        assert!(safety.allows(&["my_fn", "app.report", "other"]));
        assert!(!safety.allows(&["my_fn"]));
        assert!(!safety.allows(&["my_fn", "report"]));
        assert!(!safety.allows::<&str>(&[]));
        assert!(ReplicaSafety::Safe.allows::<&str>(&[]));
        assert!(!ReplicaSafety::Primary.allows(&["nextval"]));
    }
}
