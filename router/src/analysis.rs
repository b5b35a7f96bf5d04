//! `Analysis`: which sharded tables a statement touches, and which shard keys its text pins.
//!
//! The proxy routes a statement by the shard keys it fixes: `WHERE id = 5`, `id IN (...)`,
//! `id = ANY($1)`, the key column of `INSERT ... VALUES`, the key position of
//! `COPY ... FROM STDIN`. [`analyse`] reads them from PostgreSQL's own parse tree (pg_query)
//! for the tables the [`ShardMap`] declares; the caller turns keys into partitions and shards.
//! The analysis is pure (no IO, no clock), so [`AnalysisCache`] memoises it by statement text
//! and map epoch.
//!
//! It never guesses. A shape it does not understand leaves the table's keys unknown
//! (`keys: None`: every shard), and a constant PostgreSQL would reject, or a statement the
//! router cannot place, sets a `refusal` the caller can show. Tables are found twice over: a
//! structured walk of the query levels it understands (FROM lists, WHERE clauses, WITH
//! queries, subqueries), which also extracts keys and resolves WITH names; and, for every
//! other part of a tree, a generic scan over all nodes (`TreeScan`, through the
//! `serde::Serialize` that pg_query derives for each node type), so that no node type can
//! hide a sharded table.
//!
//! From the same parse, the analysis also says whether the text may run on one of the
//! shard's streaming replicas rather than its primary ([`ReplicaSafety`]).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pg_query::protobuf::a_const::Val;
use pg_query::protobuf::{
    AConst, AExpr, AExprKind, BoolExprType, ColumnRef, CopyStmt, DeleteStmt, DropStmt, InsertStmt,
    JoinExpr, JoinType, ObjectType, RangeVar, ReturningClause, SelectStmt, SetOperation, TypeName,
    UpdateStmt, WindowDef, WithClause,
};
use pg_query::{Node, NodeEnum};

use crate::error::{Error, Result};
use crate::hash::KeyValue;
use crate::replica::{self, ReplicaSafety};
use crate::shard_map::{Epoch, KeyType, ShardMap, Table};
use crate::tree_scan::TreeScan;

/// What a statement text does to sharded tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    /// The kind of the text's first statement.
    pub kind: StatementKind,
    /// One entry per reference to a sharded table, in the order the walk met them; a
    /// table referenced twice (a self-join) appears twice. Unsharded tables are absent.
    pub targets: Vec<TableTarget>,
    /// Why the statement must not be routed, in words the client can be shown; the first
    /// reason found. `targets` are still filled in as far as they could be.
    pub refusal: Option<String>,
    /// Whether the whole text may run on a streaming replica (a hot standby) of the shard
    /// instead of its primary. Independent of the map and of any configuration: functions
    /// the configuration may declare read-only are listed, see
    /// [`Analysis::replica_safe_with`].
    pub replica: ReplicaSafety,
    /// The text is a point read whose result may be cached: one plain SELECT of one sharded
    /// table (its only target, with exactly one key), with no function call, no value that
    /// varies between executions, no subquery of another relation, no row lock, no WITH.
    pub point_read: bool,
}

/// The kind of a statement, as far as routing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// `SELECT`, `VALUES`, `TABLE` (also with data-modifying WITH queries: see
    /// [`TableTarget::writes`]).
    Select,
    Insert,
    Update,
    Delete,
    /// `COPY`; `from_stdin` only for `COPY ... FROM STDIN` (not `TO`, not a file or program).
    Copy {
        from_stdin: bool,
    },
    /// `CREATE`, `ALTER`, `DROP`, `TRUNCATE`, `GRANT`, `COMMENT`, ..., and `SELECT ... INTO`.
    Ddl,
    /// `BEGIN`, `START TRANSACTION`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE`,
    /// `PREPARE TRANSACTION`, `COMMIT PREPARED`, `ROLLBACK PREPARED`.
    Transaction,
    /// Everything else (`SET`, `SHOW`, `EXPLAIN`, `PREPARE`, `MERGE`, `LOCK`, ...), and texts
    /// PostgreSQL's grammar rejects.
    Other,
}

/// Where one shard-key value comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// A constant in the text, already converted to the key column's type.
    Const(KeyValue),
    /// The value of parameter `$n` (1-based). Its type is the key column's unless the text
    /// casts it (`$1::int8` on an `int4` key): the caller decodes it with the parameter
    /// type of the Parse message or ParameterDescription.
    Param(u16),
    /// Every element of the array parameter `$n` (`key = ANY($n)`).
    ParamArray(u16),
}

/// One reference to a sharded table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableTarget {
    /// The table's name as declared in the map.
    pub table: String,
    /// The keys the statement is limited to: any row it reads or writes in this table has
    /// one of them. Never empty; `None` when the text does not pin the key (every shard).
    /// For `INSERT ... VALUES`: exactly one key per row, in row order.
    pub keys: Option<Vec<KeySource>>,
    /// `INSERT` and `COPY ... FROM`: the index of the key in the statement's column list.
    pub insert_key_column: Option<usize>,
    /// `INSERT ... VALUES`: the number of rows (0 for `INSERT ... SELECT` and `COPY`).
    pub insert_rows: usize,
    /// The statement may modify this table (the target of INSERT, UPDATE, DELETE,
    /// COPY FROM, DDL), as opposed to only reading it.
    pub writes: bool,
    /// An `UPDATE` or `INSERT ... ON CONFLICT DO UPDATE` assigns the key column, which can
    /// move a row to another partition.
    pub updates_key: bool,
}

/// Analyses every statement of `sql` against the sharded tables of `map`.
///
/// A text PostgreSQL's grammar rejects gives kind [`StatementKind::Other`] and no targets:
/// the server will report the syntax error itself. Several statements give the kind of
/// the first and the targets of all, in order.
///
/// Fails only when pg_query parsed the text but cannot hand the tree over (its protobuf
/// decoding stops at about 100 nested nodes, which a chain of ~50 binary operators or
/// deeply nested subqueries reaches), or hit its own stack limit: the server may well
/// accept such a text, so it must not be mistaken for a syntax error or for a statement
/// touching no sharded table.
pub fn analyse(sql: &str, map: &ShardMap) -> Result<Analysis> {
    let parsed = match pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) {
        Ok(parsed) => parsed,
        Err(error) if is_rejected_by_grammar(&error) => return Ok(Analysis::unparsed()),
        Err(error) => return Err(Error::Parse(error)),
    };
    let mut walker = Walker::new(map);
    let mut kind = None;
    for raw in &parsed.protobuf.stmts {
        if let Some(node) = raw.stmt.as_ref().and_then(|stmt| stmt.node.as_ref()) {
            let statement_kind = walker.statement(node);
            kind.get_or_insert(statement_kind);
        }
    }
    let replica = replica::classify(&parsed.protobuf.stmts);
    let mut analysis = walker.finish(kind.unwrap_or(StatementKind::Other), replica);
    analysis.point_read =
        is_point_read(&parsed.protobuf.stmts, &analysis) && !names_a_moving_date(sql);
    Ok(analysis)
}

/// Whether `sql` holds one of the date/time input words whose value moves
/// (`'now'::timestamptz`, `'today'::date`, ...), as a whole word anywhere:
/// a literal cast to a date/time type is no function call, yet it varies.
/// (A column named `today` only costs its reads the cache.)
fn names_a_moving_date(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    let word_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    ["now", "today", "tomorrow", "yesterday"]
        .iter()
        .any(|word| {
            lower.match_indices(word).any(|(at, _)| {
                let before = at.checked_sub(1).map(|i| lower.as_bytes()[i]);
                let after = lower.as_bytes().get(at + word.len()).copied();
                !before.is_some_and(word_char) && !after.is_some_and(word_char)
            })
        })
}

/// See [`Analysis::point_read`].
fn is_point_read(statements: &[pg_query::protobuf::RawStmt], analysis: &Analysis) -> bool {
    let [raw] = statements else {
        return false;
    };
    let Some(NodeEnum::SelectStmt(select)) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        return false;
    };
    let [target] = analysis.targets.as_slice() else {
        return false;
    };
    let one_key = matches!(&target.keys, Some(keys) if keys.len() == 1);
    if analysis.refusal.is_some() || target.writes || !one_key {
        return false;
    }
    if select.op != SetOperation::SetopNone as i32 || select.with_clause.is_some() {
        return false;
    }
    let mut scan = TreeScan::default();
    if scan.scan(select.as_ref()).is_err() {
        return false;
    }
    scan.relations.len() == 1
        && scan.functions.is_empty()
        && scan.ctes.is_empty()
        && !scan.varies
        && !scan.locks_rows
        && !scan.into
        && !scan.modifies
}

/// Whether a pg_query error means the text is not valid SQL (rather than "valid, but
/// pg_query could not deliver the tree").
fn is_rejected_by_grammar(error: &pg_query::Error) -> bool {
    match error {
        pg_query::Error::Parse(message) => !message.contains("stack depth"),
        // A NUL byte: the protocol's C strings cannot carry one to the server either.
        pg_query::Error::Conversion(_) => true,
        _ => false,
    }
}

impl Analysis {
    /// Whether the text may run on a replica with no function declared read-only: only
    /// reads, and calls to no function but read-only built-ins.
    pub fn replica_safe(&self) -> bool {
        self.replica_safe_with::<&str>(&[])
    }

    /// Whether the text may run on a replica when the non-built-in functions named in
    /// `read_only_functions` (`my_func`, `app.report`: as called, exactly) are known to be
    /// read-only. See [`ReplicaSafety::allows`].
    pub fn replica_safe_with<S: AsRef<str>>(&self, read_only_functions: &[S]) -> bool {
        self.replica.allows(read_only_functions)
    }

    fn unparsed() -> Analysis {
        Analysis {
            kind: StatementKind::Other,
            targets: Vec::new(),
            refusal: None,
            replica: ReplicaSafety::Primary,
            point_read: false,
        }
    }

    /// The answer for a text [`analyse`] failed on: refused, since nothing is known.
    fn unanalysable(error: &Error) -> Analysis {
        let why = match error {
            Error::Parse(pg_query::Error::Decode(_)) => {
                "its expressions or subqueries are nested too deeply".to_owned()
            }
            other => other.to_string(),
        };
        Analysis {
            refusal: Some(format!("cannot route this statement: {why}")),
            ..Analysis::unparsed()
        }
    }
}

/// Analyses by statement text for one map epoch, at most `entries_max` of them.
///
/// Like `EffectsCache`: a `HashMap` behind a `Mutex`, cleared when full, so memory is
/// bounded by `entries_max` texts of at most [`AnalysisCache::TEXT_BYTES_MAX`] bytes (and
/// their analyses, which are smaller than their texts). The analysis depends on the map's
/// tables, so entries belong to one epoch: a lookup with another epoch misses, and storing
/// under a new epoch drops the old entries.
#[derive(Debug)]
pub struct AnalysisCache {
    entries_max: usize,
    state: Mutex<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    epoch: Epoch,
    entries: HashMap<String, Arc<Analysis>>,
}

impl AnalysisCache {
    /// Longer texts (bulk INSERTs, mostly) are analysed every time: they are rarely
    /// repeated and would dominate the cache's memory.
    pub const TEXT_BYTES_MAX: usize = 16 * 1024;

    /// A cache of at most `entries_max` texts; 0 disables caching.
    pub fn new(entries_max: usize) -> Self {
        Self {
            entries_max,
            state: Mutex::new(CacheState {
                epoch: Epoch::default(),
                entries: HashMap::with_capacity(entries_max.min(1024)),
            }),
        }
    }

    /// The analysis of `sql` under `map`, from the cache or computed. A text [`analyse`]
    /// fails on comes back refused (kind `Other`, no targets, a `refusal`).
    ///
    /// The lock is not held while analysing, so two threads may analyse the same new text;
    /// both get the same answer.
    pub fn get_or_analyse(&self, sql: &str, map: &ShardMap) -> Arc<Analysis> {
        let cacheable = self.entries_max > 0 && sql.len() <= Self::TEXT_BYTES_MAX;
        if cacheable {
            if let Some(analysis) = self.lookup(sql, map.epoch) {
                return analysis;
            }
        }
        let analysis = analyse(sql, map).unwrap_or_else(|error| Analysis::unanalysable(&error));
        let analysis = Arc::new(analysis);
        if cacheable {
            self.store(sql, map.epoch, &analysis);
        }
        analysis
    }

    /// Number of cached texts.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no text is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, sql: &str, epoch: Epoch) -> Option<Arc<Analysis>> {
        let state = self.lock();
        if state.epoch != epoch {
            return None;
        }
        state.entries.get(sql).cloned()
    }

    fn store(&self, sql: &str, epoch: Epoch, analysis: &Arc<Analysis>) {
        let mut state = self.lock();
        if state.epoch != epoch || state.entries.len() >= self.entries_max {
            state.entries.clear();
            state.epoch = epoch;
        }
        state.entries.insert(sql.to_owned(), Arc::clone(analysis));
    }

    /// Every critical section is a single map operation, so a poisoned lock still guards a
    /// consistent map and is used as is.
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The walk over one text's parse tree.
struct Walker<'m> {
    map: &'m ShardMap,
    targets: Vec<TableTarget>,
    refusal: Option<String>,
    /// The WITH query names visible at the current point of the walk, innermost last.
    ctes: Vec<String>,
}

/// A sharded table in the FROM list of the query level being walked.
struct Bound<'t, 'm> {
    /// Its index in `Walker::targets`.
    target: usize,
    table: &'m Table,
    /// What its columns are qualified with: the alias, else the relation name.
    qualifier: &'t str,
    aliased: bool,
    /// False when the key column may not be visible under its name: the alias renames
    /// columns (`accounts AS a (x, y)`) or an aliased join hides the table.
    key_visible: bool,
}

/// The sharded tables of one query level and the conditions that restrict them.
#[derive(Default)]
struct Level<'t, 'm> {
    bound: Vec<Bound<'t, 'm>>,
    /// The ON condition of each inner join and the range of `bound` it joins.
    join_quals: Vec<(&'t Node, Range<usize>)>,
}

/// A value-side operand of a key comparison.
enum Operand {
    Key(KeySource),
    /// SQL NULL: equal to nothing.
    Null,
    /// Not a constant or parameter the walk can evaluate (a column, an expression, an
    /// unknown cast).
    Unusable,
}

impl<'m> Walker<'m> {
    fn new(map: &'m ShardMap) -> Self {
        Walker {
            map,
            targets: Vec::new(),
            refusal: None,
            ctes: Vec::new(),
        }
    }

    fn finish(self, kind: StatementKind, replica: ReplicaSafety) -> Analysis {
        Analysis {
            kind,
            targets: self.targets,
            refusal: self.refusal,
            replica,
            point_read: false,
        }
    }

    fn refuse(&mut self, why: String) {
        self.refusal.get_or_insert(why);
    }

    fn add_target(&mut self, table: &Table, writes: bool) -> usize {
        self.targets.push(TableTarget {
            table: table.name.clone(),
            keys: None,
            insert_key_column: None,
            insert_rows: 0,
            writes,
            updates_key: false,
        });
        self.targets.len() - 1
    }

    /// The sharded table `rv` names. Names are compared as the parser leaves them
    /// (unquoted identifiers folded to lower case), ignoring any schema. In a FROM list a
    /// visible WITH query of the same unqualified name wins; the target relation of
    /// INSERT, UPDATE, DELETE or COPY is always a table (`cte_may_shadow` false).
    fn sharded(&self, rv: &RangeVar, cte_may_shadow: bool) -> Option<&'m Table> {
        let map: &'m ShardMap = self.map;
        if cte_may_shadow && rv.schemaname.is_empty() && self.ctes.contains(&rv.relname) {
            return None;
        }
        map.tables.get(&rv.relname)
    }

    // ---- statements -------------------------------------------------------------------

    fn statement(&mut self, node: &NodeEnum) -> StatementKind {
        match node {
            NodeEnum::SelectStmt(s) => {
                self.select(s);
                if s.into_clause.is_some() {
                    StatementKind::Ddl
                } else {
                    StatementKind::Select
                }
            }
            NodeEnum::InsertStmt(s) => {
                self.insert(s);
                StatementKind::Insert
            }
            NodeEnum::UpdateStmt(s) => {
                self.update(s);
                StatementKind::Update
            }
            NodeEnum::DeleteStmt(s) => {
                self.delete(s);
                StatementKind::Delete
            }
            NodeEnum::CopyStmt(s) => self.copy(s),
            NodeEnum::TransactionStmt(_) => StatementKind::Transaction,
            _ => self.wrapper_statement(node),
        }
    }

    /// Statements that wrap a query the walk understands, and everything else.
    fn wrapper_statement(&mut self, node: &NodeEnum) -> StatementKind {
        match node {
            NodeEnum::ExplainStmt(s) => self.query_opt(s.query.as_deref()),
            NodeEnum::PrepareStmt(s) => self.query_opt(s.query.as_deref()),
            NodeEnum::DeclareCursorStmt(s) => self.query_opt(s.query.as_deref()),
            NodeEnum::CreateTableAsStmt(s) => self.query_opt(s.query.as_deref()),
            NodeEnum::DropStmt(s) => self.drop(s),
            other => self.opaque(other, true),
        }
        if is_ddl(node) {
            StatementKind::Ddl
        } else {
            StatementKind::Other
        }
    }

    /// A node that holds a statement: a subquery, a WITH query, a wrapped query.
    fn query(&mut self, node: &Node) {
        match node.node.as_ref() {
            Some(NodeEnum::SelectStmt(s)) => self.select(s),
            Some(NodeEnum::InsertStmt(s)) => self.insert(s),
            Some(NodeEnum::UpdateStmt(s)) => self.update(s),
            Some(NodeEnum::DeleteStmt(s)) => self.delete(s),
            Some(other) => self.opaque(other, true),
            None => {}
        }
    }

    fn query_opt(&mut self, node: Option<&Node>) {
        if let Some(node) = node {
            self.query(node);
        }
    }

    /// Walks the WITH queries and makes their names visible; returns the mark to truncate
    /// `ctes` to when the statement ends. In a non-recursive WITH each query sees only the
    /// ones before it; in `WITH RECURSIVE` all of them.
    fn with(&mut self, with: Option<&WithClause>) -> usize {
        let mark = self.ctes.len();
        let Some(with) = with else {
            return mark;
        };
        if with.recursive {
            self.ctes
                .extend(with.ctes.iter().filter_map(cte_name).map(str::to_owned));
        }
        for node in &with.ctes {
            match node.node.as_ref() {
                Some(NodeEnum::CommonTableExpr(cte)) => {
                    self.query_opt(cte.ctequery.as_deref());
                    if !with.recursive {
                        self.ctes.push(cte.ctename.clone());
                    }
                }
                Some(other) => self.opaque(other, true),
                None => {}
            }
        }
        mark
    }

    fn select(&mut self, s: &SelectStmt) {
        let mark = self.with(s.with_clause.as_ref());
        match s.op() {
            SetOperation::SetopNone | SetOperation::Undefined => self.select_level(s),
            _ => {
                for arm in [&s.larg, &s.rarg].into_iter().flatten() {
                    self.select(arm);
                }
            }
        }
        self.exprs(&s.sort_clause);
        self.expr_opt(s.limit_offset.as_deref());
        self.expr_opt(s.limit_count.as_deref());
        self.ctes.truncate(mark);
    }

    /// One plain SELECT (or VALUES): its FROM list is a query level. The locking clause
    /// and INTO name no tables to read (`FOR UPDATE OF a` names FROM items).
    fn select_level(&mut self, s: &SelectStmt) {
        let mut level = Level::default();
        for item in &s.from_clause {
            self.range_item(item, &mut level);
        }
        for list in [
            &s.distinct_clause,
            &s.target_list,
            &s.group_clause,
            &s.window_clause,
            &s.values_lists,
        ] {
            self.exprs(list);
        }
        self.expr_opt(s.having_clause.as_deref());
        self.expr_opt(s.where_clause.as_deref());
        self.fix_keys(&level, s.where_clause.as_deref());
    }

    fn insert(&mut self, ins: &InsertStmt) {
        let mark = self.with(ins.with_clause.as_ref());
        if let Some(table) = ins.relation.as_ref().and_then(|rv| self.sharded(rv, false)) {
            self.insert_target(table, ins);
        }
        self.query_opt(ins.select_stmt.as_deref());
        if let Some(conflict) = &ins.on_conflict_clause {
            self.exprs(&conflict.target_list);
            self.expr_opt(conflict.where_clause.as_deref());
        }
        self.returning(ins.returning_clause.as_ref());
        self.ctes.truncate(mark);
    }

    fn insert_target(&mut self, table: &Table, ins: &InsertStmt) {
        let target = self.add_target(table, true);
        self.targets[target].updates_key = ins
            .on_conflict_clause
            .as_ref()
            .is_some_and(|conflict| assigns(&conflict.target_list, &table.key));
        let Some(column) = self.insert_key_column(table, ins) else {
            return;
        };
        self.targets[target].insert_key_column = Some(column);
        let Some(rows) = values_rows(ins.select_stmt.as_deref()) else {
            return; // INSERT ... SELECT: the keys are only known once the query runs.
        };
        let operands: Vec<Operand> = rows
            .iter()
            .map(|row| self.row_key(row, column, table))
            .collect();
        self.targets[target].insert_rows = rows.len();
        self.targets[target].keys = every_row(operands);
    }

    /// The position of the key in an INSERT's column list, or a refusal.
    fn insert_key_column(&mut self, table: &Table, ins: &InsertStmt) -> Option<usize> {
        if ins.cols.is_empty() && ins.select_stmt.is_some() {
            self.refuse(format!(
                "INSERT into sharded table {} needs a column list",
                table.name
            ));
            return None;
        }
        let column = ins.cols.iter().position(|col| match col.node.as_ref() {
            Some(NodeEnum::ResTarget(r)) => r.name == table.key && r.indirection.is_empty(),
            _ => false,
        });
        if column.is_none() {
            self.refuse(format!(
                "INSERT into sharded table {} must set its key column {}",
                table.name, table.key
            ));
        }
        column
    }

    fn row_key(&mut self, row: &Node, column: usize, table: &Table) -> Operand {
        match row.node.as_ref() {
            Some(NodeEnum::List(values)) => match values.items.get(column) {
                Some(value) => self.operand(value, None, table),
                None => Operand::Unusable,
            },
            _ => Operand::Unusable,
        }
    }

    fn update(&mut self, u: &UpdateStmt) {
        let mark = self.with(u.with_clause.as_ref());
        let mut level = Level::default();
        if let Some(target) = u
            .relation
            .as_ref()
            .and_then(|rv| self.bind(rv, &mut level, true))
        {
            let key = &level.bound[0].table.key;
            self.targets[target].updates_key = assigns(&u.target_list, key);
        }
        for item in &u.from_clause {
            self.range_item(item, &mut level);
        }
        self.exprs(&u.target_list);
        self.expr_opt(u.where_clause.as_deref());
        self.returning(u.returning_clause.as_ref());
        self.fix_keys(&level, u.where_clause.as_deref());
        self.ctes.truncate(mark);
    }

    fn delete(&mut self, d: &DeleteStmt) {
        let mark = self.with(d.with_clause.as_ref());
        let mut level = Level::default();
        if let Some(rv) = &d.relation {
            self.bind(rv, &mut level, true);
        }
        for item in &d.using_clause {
            self.range_item(item, &mut level);
        }
        self.expr_opt(d.where_clause.as_deref());
        self.returning(d.returning_clause.as_ref());
        self.fix_keys(&level, d.where_clause.as_deref());
        self.ctes.truncate(mark);
    }

    fn returning(&mut self, returning: Option<&ReturningClause>) {
        if let Some(returning) = returning {
            self.exprs(&returning.exprs);
        }
    }

    fn copy(&mut self, c: &CopyStmt) -> StatementKind {
        let from_stdin = c.is_from && !c.is_program && c.filename.is_empty();
        self.query_opt(c.query.as_deref());
        if let Some(table) = c.relation.as_ref().and_then(|rv| self.sharded(rv, false)) {
            let target = self.add_target(table, c.is_from);
            if c.is_from {
                self.copy_from(target, table, c, from_stdin);
            }
        }
        StatementKind::Copy { from_stdin }
    }

    /// `COPY table FROM`: the rows are split by the caller, so it needs the key's position.
    fn copy_from(&mut self, target: usize, table: &Table, c: &CopyStmt, from_stdin: bool) {
        if !from_stdin {
            self.refuse(format!(
                "COPY into sharded table {} must read FROM STDIN, not a server file or program",
                table.name
            ));
        }
        if c.attlist.is_empty() {
            self.refuse(format!(
                "COPY into sharded table {} needs a column list",
                table.name
            ));
            return;
        }
        let column = c
            .attlist
            .iter()
            .position(|name| str_of(name) == Some(table.key.as_str()));
        match column {
            Some(column) => self.targets[target].insert_key_column = Some(column),
            None => self.refuse(format!(
                "COPY into sharded table {} must include its key column {}",
                table.name, table.key
            )),
        }
    }

    /// `DROP TABLE` names its tables as lists of strings, not as relations.
    fn drop(&mut self, d: &DropStmt) {
        if d.remove_type() != ObjectType::ObjectTable {
            return;
        }
        let map: &'m ShardMap = self.map;
        for object in &d.objects {
            let Some(NodeEnum::List(name)) = object.node.as_ref() else {
                continue;
            };
            let relname = name.items.last().and_then(str_of);
            if let Some(table) = relname.and_then(|relname| map.tables.get(relname)) {
                self.add_target(table, true);
            }
        }
    }

    // ---- FROM lists ---------------------------------------------------------------------

    fn range_item<'t>(&mut self, node: &'t Node, level: &mut Level<'t, 'm>) {
        match node.node.as_ref() {
            Some(NodeEnum::RangeVar(rv)) => {
                self.bind(rv, level, false);
            }
            Some(NodeEnum::JoinExpr(join)) => self.join(join, level),
            Some(NodeEnum::RangeSubselect(sub)) => self.query_opt(sub.subquery.as_deref()),
            Some(NodeEnum::RangeFunction(function)) => self.exprs(&function.functions),
            Some(NodeEnum::RangeTableSample(sample)) => {
                if let Some(relation) = sample.relation.as_deref() {
                    self.range_item(relation, level);
                }
                self.exprs(&sample.args);
                self.expr_opt(sample.repeatable.as_deref());
            }
            Some(other) => self.opaque(other, false),
            None => {}
        }
    }

    fn join<'t>(&mut self, join: &'t JoinExpr, level: &mut Level<'t, 'm>) {
        let start = level.bound.len();
        for side in [&join.larg, &join.rarg].into_iter().flatten() {
            self.range_item(side, level);
        }
        self.expr_opt(join.quals.as_deref());
        let joined = start..level.bound.len();
        if join.alias.is_some() {
            for bound in &mut level.bound[joined.clone()] {
                bound.key_visible = false;
            }
        }
        // Only an inner join's condition limits the rows of both sides; an outer join
        // keeps the rows of its preserved side whatever the condition says.
        if let (JoinType::JoinInner, Some(quals)) = (join.jointype(), join.quals.as_deref()) {
            level.join_quals.push((quals, joined));
        }
    }

    /// Adds `rv` to the level if it is a sharded table; returns its target index.
    fn bind<'t>(
        &mut self,
        rv: &'t RangeVar,
        level: &mut Level<'t, 'm>,
        writes: bool,
    ) -> Option<usize> {
        let table = self.sharded(rv, !writes)?;
        let target = self.add_target(table, writes);
        let alias = rv.alias.as_ref();
        level.bound.push(Bound {
            target,
            table,
            qualifier: alias.map_or(rv.relname.as_str(), |a| a.aliasname.as_str()),
            aliased: alias.is_some(),
            key_visible: alias.into_iter().all(|a| a.colnames.is_empty()),
        });
        Some(target)
    }

    // ---- keys ---------------------------------------------------------------------------

    /// Sets the keys of every table of `level` from the WHERE clause and the inner-join
    /// conditions over it, keeping the smallest set any of them pins.
    fn fix_keys(&mut self, level: &Level<'_, 'm>, where_clause: Option<&Node>) {
        for (index, bound) in level.bound.iter().enumerate() {
            let join_quals = level
                .join_quals
                .iter()
                .filter(|(_, joined)| joined.contains(&index))
                .map(|(quals, _)| *quals);
            let mut best: Option<Vec<KeySource>> = None;
            for condition in where_clause.into_iter().chain(join_quals) {
                if let Some(keys) = self.keys_of(condition, bound) {
                    keep_smaller(&mut best, keys);
                }
            }
            self.targets[bound.target].keys = best;
        }
    }

    /// The keys a boolean condition limits `bound` to: an AND needs one conjunct that pins
    /// the key, an OR needs every branch to.
    fn keys_of(&mut self, condition: &Node, bound: &Bound) -> Option<Vec<KeySource>> {
        match condition.node.as_ref()? {
            NodeEnum::BoolExpr(b) => match b.boolop() {
                BoolExprType::AndExpr => {
                    let mut best = None;
                    for arg in &b.args {
                        if let Some(keys) = self.keys_of(arg, bound) {
                            keep_smaller(&mut best, keys);
                        }
                    }
                    best
                }
                BoolExprType::OrExpr => {
                    let mut all = Vec::new();
                    for arg in &b.args {
                        all.extend(self.keys_of(arg, bound)?);
                    }
                    Some(dedup(all))
                }
                _ => None,
            },
            NodeEnum::AExpr(a) => self.comparison_keys(a, bound),
            _ => None,
        }
    }

    /// `key = v`, `v = key`, `key IN (v, ...)`, `key = ANY(array)`.
    fn comparison_keys(&mut self, a: &AExpr, bound: &Bound) -> Option<Vec<KeySource>> {
        if !is_equality(&a.name) {
            return None;
        }
        let (left, right) = (a.lexpr.as_deref()?, a.rexpr.as_deref()?);
        match a.kind() {
            AExprKind::AexprOp => {
                let value = if is_key_ref(left, bound) {
                    right
                } else if is_key_ref(right, bound) {
                    left
                } else {
                    return None;
                };
                match self.operand(value, None, bound.table) {
                    Operand::Key(key) => Some(vec![key]),
                    Operand::Null | Operand::Unusable => None,
                }
            }
            AExprKind::AexprIn if is_key_ref(left, bound) => match right.node.as_ref()? {
                NodeEnum::List(list) => self.list_keys(&list.items, None, bound.table),
                _ => None,
            },
            AExprKind::AexprOpAny if is_key_ref(left, bound) => self.array_keys(right, bound.table),
            _ => None,
        }
    }

    fn list_keys(
        &mut self,
        items: &[Node],
        cast: Option<Cast>,
        table: &Table,
    ) -> Option<Vec<KeySource>> {
        let operands: Vec<Operand> = items
            .iter()
            .map(|item| self.operand(item, cast, table))
            .collect();
        gather(operands)
    }

    /// The keys of the array in `key = ANY(array)`: a parameter, `ARRAY[...]`, or an array
    /// literal, optionally cast to an array of the key's type.
    fn array_keys(&mut self, node: &Node, table: &Table) -> Option<Vec<KeySource>> {
        let (inner, cast) = match node.node.as_ref()? {
            NodeEnum::TypeCast(c) => {
                let (cast, array) = type_of(c.type_name.as_ref());
                if !array || !cast.fits(table.key_type) {
                    return None;
                }
                (c.arg.as_deref()?, Some(cast))
            }
            _ => (node, None),
        };
        match inner.node.as_ref()? {
            NodeEnum::ParamRef(p) => param(p.number).map(|n| vec![KeySource::ParamArray(n)]),
            NodeEnum::AArrayExpr(array) => self.list_keys(&array.elements, cast, table),
            NodeEnum::AConst(c) => self.array_literal_keys(c, cast, table),
            _ => None,
        }
    }

    fn array_literal_keys(
        &mut self,
        c: &AConst,
        cast: Option<Cast>,
        table: &Table,
    ) -> Option<Vec<KeySource>> {
        let Some(Val::Sval(text)) = c.val.as_ref().filter(|_| !c.isnull) else {
            return None;
        };
        let operands: Vec<Operand> = parse_array_literal(&text.sval)?
            .into_iter()
            .map(|element| match element {
                None => Operand::Null,
                Some(text) => {
                    let literal = cast.into_iter().fold(Lit::Str(text), Lit::cast);
                    self.convert(literal, table)
                }
            })
            .collect();
        gather(operands)
    }

    /// A constant or parameter compared with `table`'s key, after the casts written on it
    /// and an extra outermost one (the element type of an array cast). The outermost cast
    /// must be to the key's type family, else the comparison is not on the key's values.
    fn operand(&mut self, node: &Node, extra: Option<Cast>, table: &Table) -> Operand {
        let (base, mut casts) = peel_casts(node);
        casts.extend(extra);
        if casts.last().is_some_and(|cast| !cast.fits(table.key_type)) {
            return Operand::Unusable;
        }
        match base.node.as_ref() {
            // `$1::text::int8` converts text: decoding it as the key would be a guess.
            Some(NodeEnum::ParamRef(p)) if casts.len() <= 1 => {
                param(p.number).map_or(Operand::Unusable, |n| Operand::Key(KeySource::Param(n)))
            }
            Some(NodeEnum::AConst(c)) => {
                let literal = casts.into_iter().fold(Lit::of(c), Lit::cast);
                self.convert(literal, table)
            }
            _ => Operand::Unusable,
        }
    }

    /// A constant as a value of `table`'s key type; a constant PostgreSQL would reject
    /// (or, for integers, one outside the key type's range) refuses the statement.
    fn convert(&mut self, literal: Lit, table: &Table) -> Operand {
        let converted = match literal {
            Lit::Null => return Operand::Null,
            Lit::Number | Lit::Opaque => return Operand::Unusable,
            Lit::Invalid { text, ty, range } => Err(bad_value(
                &text,
                ty.unwrap_or(table.key_type.as_str()),
                range,
                table,
            )),
            Lit::Int(value) => int_key(value, table),
            Lit::Str(text) => str_key(&text, table),
            Lit::Uuid(bytes) if table.key_type == KeyType::Uuid => Ok(KeyValue::Uuid(bytes)),
            Lit::Uuid(_) => return Operand::Unusable,
        };
        match converted {
            Ok(value) => Operand::Key(KeySource::Const(value)),
            Err(why) => {
                self.refuse(why);
                Operand::Unusable
            }
        }
    }

    // ---- expressions --------------------------------------------------------------------

    fn exprs(&mut self, nodes: &[Node]) {
        for node in nodes {
            self.expr(node);
        }
    }

    fn expr_opt(&mut self, node: Option<&Node>) {
        if let Some(node) = node {
            self.expr(node);
        }
    }

    /// Walks an expression for the subqueries in it; node types it does not know are
    /// scanned generically.
    fn expr(&mut self, node: &Node) {
        match node.node.as_ref() {
            None => {}
            Some(NodeEnum::SubLink(sub)) => {
                self.expr_opt(sub.testexpr.as_deref());
                self.query_opt(sub.subselect.as_deref());
            }
            Some(other) => match expression_children(other) {
                Some(children) => children.into_iter().for_each(|child| self.expr(child)),
                None => self.opaque(other, false),
            },
        }
    }

    /// Records every sharded table named anywhere under `node`, without keys. A name that
    /// could be either a sharded table or a WITH query defined in there is refused rather
    /// than guessed: the scan does not know the scopes.
    fn opaque(&mut self, node: &NodeEnum, writes: bool) {
        let mut scan = TreeScan::default();
        if scan.scan(node).is_err() {
            self.refuse("cannot route this statement: its parse tree could not be read".into());
        }
        let map: &'m ShardMap = self.map;
        for (schemaname, relname) in &scan.relations {
            let Some(table) = map.tables.get(relname) else {
                continue;
            };
            let unqualified = schemaname.is_empty();
            if unqualified && self.ctes.contains(relname) {
                continue;
            }
            if unqualified && scan.ctes.contains(relname) {
                self.refuse(format!(
                    "cannot tell whether \"{relname}\" names the sharded table or a WITH query of the same name here; rename the WITH query"
                ));
            }
            self.add_target(table, writes);
        }
    }
}

/// The sub-expressions of the expression node types the walk knows; `None` for others.
fn expression_children(node: &NodeEnum) -> Option<Vec<&Node>> {
    let mut out: Vec<&Node> = Vec::new();
    match node {
        NodeEnum::ColumnRef(_)
        | NodeEnum::AConst(_)
        | NodeEnum::ParamRef(_)
        | NodeEnum::AStar(_)
        | NodeEnum::SqlvalueFunction(_)
        | NodeEnum::SetToDefault(_)
        | NodeEnum::CurrentOfExpr(_)
        | NodeEnum::String(_)
        | NodeEnum::Integer(_) => {}
        NodeEnum::AExpr(e) => out.extend(e.lexpr.as_deref().into_iter().chain(e.rexpr.as_deref())),
        NodeEnum::BoolExpr(e) => out.extend(&e.args),
        NodeEnum::List(l) => out.extend(&l.items),
        NodeEnum::TypeCast(c) => out.extend(c.arg.as_deref()),
        NodeEnum::ResTarget(r) => out.extend(r.val.as_deref().into_iter().chain(&r.indirection)),
        NodeEnum::SortBy(s) => out.extend(s.node.as_deref()),
        NodeEnum::FuncCall(f) => {
            out.extend(
                f.args
                    .iter()
                    .chain(&f.agg_order)
                    .chain(f.agg_filter.as_deref()),
            );
            if let Some(window) = &f.over {
                out.extend(window_children(window));
            }
        }
        NodeEnum::WindowDef(w) => out.extend(window_children(w)),
        NodeEnum::CaseExpr(c) => out.extend(
            c.arg
                .as_deref()
                .into_iter()
                .chain(&c.args)
                .chain(c.defresult.as_deref()),
        ),
        NodeEnum::CaseWhen(w) => {
            out.extend(w.expr.as_deref().into_iter().chain(w.result.as_deref()))
        }
        NodeEnum::CoalesceExpr(c) => out.extend(&c.args),
        NodeEnum::MinMaxExpr(m) => out.extend(&m.args),
        NodeEnum::RowExpr(r) => out.extend(&r.args),
        NodeEnum::NullTest(t) => out.extend(t.arg.as_deref()),
        NodeEnum::BooleanTest(t) => out.extend(t.arg.as_deref()),
        NodeEnum::AArrayExpr(a) => out.extend(&a.elements),
        NodeEnum::AIndirection(i) => out.extend(i.arg.as_deref().into_iter().chain(&i.indirection)),
        NodeEnum::AIndices(i) => out.extend(i.lidx.as_deref().into_iter().chain(i.uidx.as_deref())),
        NodeEnum::NamedArgExpr(n) => out.extend(n.arg.as_deref()),
        NodeEnum::CollateClause(c) => out.extend(c.arg.as_deref()),
        NodeEnum::MultiAssignRef(m) => out.extend(m.source.as_deref()),
        NodeEnum::GroupingSet(g) => out.extend(&g.content),
        _ => return None,
    }
    Some(out)
}

fn window_children(w: &WindowDef) -> impl Iterator<Item = &Node> {
    w.partition_clause
        .iter()
        .chain(&w.order_clause)
        .chain(w.start_offset.as_deref())
        .chain(w.end_offset.as_deref())
}

/// Statement node types that define or change schema objects or privileges.
fn is_ddl(node: &NodeEnum) -> bool {
    matches!(
        node,
        NodeEnum::CreateStmt(_)
            | NodeEnum::CreateTableAsStmt(_)
            | NodeEnum::CreateForeignTableStmt(_)
            | NodeEnum::AlterTableStmt(_)
            | NodeEnum::DropStmt(_)
            | NodeEnum::TruncateStmt(_)
            | NodeEnum::IndexStmt(_)
            | NodeEnum::ViewStmt(_)
            | NodeEnum::RenameStmt(_)
            | NodeEnum::CreateSchemaStmt(_)
            | NodeEnum::CreateSeqStmt(_)
            | NodeEnum::AlterSeqStmt(_)
            | NodeEnum::CreateFunctionStmt(_)
            | NodeEnum::AlterFunctionStmt(_)
            | NodeEnum::CreateTrigStmt(_)
            | NodeEnum::RuleStmt(_)
            | NodeEnum::DefineStmt(_)
            | NodeEnum::CompositeTypeStmt(_)
            | NodeEnum::CreateEnumStmt(_)
            | NodeEnum::AlterEnumStmt(_)
            | NodeEnum::CreateDomainStmt(_)
            | NodeEnum::AlterDomainStmt(_)
            | NodeEnum::CreateExtensionStmt(_)
            | NodeEnum::AlterExtensionStmt(_)
            | NodeEnum::AlterObjectSchemaStmt(_)
            | NodeEnum::AlterOwnerStmt(_)
            | NodeEnum::CommentStmt(_)
            | NodeEnum::GrantStmt(_)
            | NodeEnum::GrantRoleStmt(_)
            | NodeEnum::AlterDefaultPrivilegesStmt(_)
            | NodeEnum::CreatePolicyStmt(_)
            | NodeEnum::AlterPolicyStmt(_)
            | NodeEnum::CreateStatsStmt(_)
            | NodeEnum::CreateRoleStmt(_)
            | NodeEnum::AlterRoleStmt(_)
            | NodeEnum::DropRoleStmt(_)
            | NodeEnum::CreatedbStmt(_)
            | NodeEnum::DropdbStmt(_)
    )
}

// ---- column references and operators -------------------------------------------------

/// Whether `node` is `bound`'s key column, possibly under a cast that keeps every key
/// value distinct (to a type of the same family, no narrower).
fn is_key_ref(node: &Node, bound: &Bound) -> bool {
    match node.node.as_ref() {
        Some(NodeEnum::ColumnRef(c)) => names_key(c, bound),
        Some(NodeEnum::TypeCast(c)) => {
            let (cast, array) = type_of(c.type_name.as_ref());
            !array
                && cast.keeps(bound.table.key_type)
                && c.arg.as_deref().is_some_and(|arg| is_key_ref(arg, bound))
        }
        _ => false,
    }
}

/// Whether a column reference names `bound`'s key. An unqualified name is the key if
/// the table has it visible: another table of the level with the same column would make
/// the reference ambiguous, which PostgreSQL rejects.
fn names_key(c: &ColumnRef, bound: &Bound) -> bool {
    if !bound.key_visible {
        return false;
    }
    let mut names = Vec::with_capacity(c.fields.len());
    for field in &c.fields {
        match str_of(field) {
            Some(name) => names.push(name),
            None => return false, // `a.*`
        }
    }
    let key = bound.table.key.as_str();
    match names.as_slice() {
        [column] => *column == key,
        [qualifier, column] => *qualifier == bound.qualifier && *column == key,
        // `schema.table.column`, `catalog.schema.table.column`: only without an alias.
        [_, .., relation, column] => {
            !bound.aliased && *relation == bound.qualifier && *column == key
        }
        [] => false,
    }
}

/// `=` or `OPERATOR(pg_catalog.=)`.
fn is_equality(name: &[Node]) -> bool {
    match name {
        [op] => str_of(op) == Some("="),
        [schema, op] => str_of(schema) == Some("pg_catalog") && str_of(op) == Some("="),
        _ => false,
    }
}

/// Whether an UPDATE's SET list (or ON CONFLICT's) assigns `column`.
fn assigns(set_list: &[Node], column: &str) -> bool {
    set_list.iter().any(|node| match node.node.as_ref() {
        Some(NodeEnum::ResTarget(r)) => r.name == column,
        _ => false,
    })
}

fn str_of(node: &Node) -> Option<&str> {
    match node.node.as_ref() {
        Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
        _ => None,
    }
}

fn cte_name(node: &Node) -> Option<&str> {
    match node.node.as_ref() {
        Some(NodeEnum::CommonTableExpr(cte)) => Some(cte.ctename.as_str()),
        _ => None,
    }
}

/// `$n` as a protocol parameter number (1..=65535).
fn param(number: i32) -> Option<u16> {
    u16::try_from(number).ok().filter(|n| *n > 0)
}

/// The rows of `INSERT ... VALUES`; `None` for any other source.
fn values_rows(source: Option<&Node>) -> Option<&[Node]> {
    match source?.node.as_ref()? {
        NodeEnum::SelectStmt(s) if !s.values_lists.is_empty() => Some(&s.values_lists),
        _ => None,
    }
}

// ---- key sets -------------------------------------------------------------------------

fn keep_smaller(best: &mut Option<Vec<KeySource>>, keys: Vec<KeySource>) {
    match best {
        Some(kept) if kept.len() <= keys.len() => {}
        _ => *best = Some(keys),
    }
}

fn dedup(keys: Vec<KeySource>) -> Vec<KeySource> {
    let mut seen = HashSet::with_capacity(keys.len());
    keys.into_iter()
        .filter(|key| seen.insert(key.clone()))
        .collect()
}

/// The keys of a list of alternatives (`IN`, `ANY`): NULLs match nothing and drop out;
/// one unusable element makes the whole list unusable. An empty result (`= ANY('{}')`)
/// is reported as `None` so that `Some` always names at least one key.
fn gather(operands: Vec<Operand>) -> Option<Vec<KeySource>> {
    let mut keys = Vec::with_capacity(operands.len());
    for operand in operands {
        match operand {
            Operand::Key(key) => keys.push(key),
            Operand::Null => {}
            Operand::Unusable => return None,
        }
    }
    Some(dedup(keys)).filter(|keys| !keys.is_empty())
}

/// One key per INSERT row, or `None` if any row's key is not a usable constant or
/// parameter (a NULL key cannot be routed by a key either).
fn every_row(operands: Vec<Operand>) -> Option<Vec<KeySource>> {
    operands
        .into_iter()
        .map(|operand| match operand {
            Operand::Key(key) => Some(key),
            Operand::Null | Operand::Unusable => None,
        })
        .collect()
}

// ---- casts and constants ----------------------------------------------------------------

/// The type families a cast can name, as far as keys go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cast {
    /// `int2`, `int4`, `int8`: the width in bytes.
    Int(u8),
    /// `text`, or `varchar` without a length (a length would truncate).
    Text,
    Uuid,
    Other,
}

impl Cast {
    /// Whether a value of this type compares with the key by the key's own equality.
    fn fits(self, key_type: KeyType) -> bool {
        match self {
            Cast::Int(_) => int_width(key_type).is_some(),
            Cast::Text => key_type == KeyType::Text,
            Cast::Uuid => key_type == KeyType::Uuid,
            Cast::Other => false,
        }
    }

    /// Whether casting the key column to this type keeps all its values distinct.
    fn keeps(self, key_type: KeyType) -> bool {
        match self {
            Cast::Int(width) => int_width(key_type).is_some_and(|key_width| key_width <= width),
            other => other.fits(key_type),
        }
    }
}

fn int_width(key_type: KeyType) -> Option<u8> {
    match key_type {
        KeyType::Int2 => Some(2),
        KeyType::Int4 => Some(4),
        KeyType::Int8 => Some(8),
        KeyType::Text | KeyType::Uuid => None,
    }
}

/// The family a type name belongs to, and whether it is an array of it. The grammar
/// spells `smallint`, `integer`, `bigint` and `character varying` as `pg_catalog.int2`,
/// `pg_catalog.int4`, `pg_catalog.int8` and `pg_catalog.varchar`.
fn type_of(type_name: Option<&TypeName>) -> (Cast, bool) {
    let Some(t) = type_name else {
        return (Cast::Other, false);
    };
    let name = match t.names.as_slice() {
        [name] => str_of(name),
        [schema, name] if str_of(schema) == Some("pg_catalog") => str_of(name),
        _ => None,
    };
    let plain = !t.setof && !t.pct_type && t.typmods.is_empty();
    let cast = match name {
        _ if !plain => Cast::Other,
        Some("int2") => Cast::Int(2),
        Some("int4") => Cast::Int(4),
        Some("int8") => Cast::Int(8),
        Some("text" | "varchar") => Cast::Text,
        Some("uuid") => Cast::Uuid,
        _ => Cast::Other,
    };
    (cast, !t.array_bounds.is_empty())
}

/// The innermost operand under a chain of casts, and the casts from the innermost out.
/// An array cast in the chain counts as an unknown type.
fn peel_casts(mut node: &Node) -> (&Node, Vec<Cast>) {
    let mut casts = Vec::new();
    while let Some(NodeEnum::TypeCast(c)) = node.node.as_ref() {
        let Some(arg) = c.arg.as_deref() else {
            break;
        };
        let (cast, array) = type_of(c.type_name.as_ref());
        casts.push(if array { Cast::Other } else { cast });
        node = arg;
    }
    casts.reverse();
    (node, casts)
}

/// A constant as the walk evaluates it through casts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Lit {
    Null,
    Int(i64),
    /// A numeric constant that is not an integer (`5.5`, `1e3`).
    Number,
    /// A string constant, or a value cast to text.
    Str(String),
    Uuid([u8; 16]),
    /// A cast PostgreSQL would reject: `'abc'::int8`. `ty` is the type named in the
    /// error, `None` for the key's own type.
    Invalid {
        text: String,
        ty: Option<&'static str>,
        range: bool,
    },
    /// Anything else: booleans, bit strings, values of other types.
    Opaque,
}

impl Lit {
    fn of(c: &AConst) -> Lit {
        if c.isnull {
            return Lit::Null;
        }
        match c.val.as_ref() {
            Some(Val::Ival(i)) => Lit::Int(i64::from(i.ival)),
            // Integers beyond int4 arrive as written: `99999999999`, `0x1_0000_0000`.
            Some(Val::Fval(f)) => match parse_pg_int(&f.fval) {
                Ok(value) => Lit::Int(value),
                Err(IntError::Range) => Lit::Invalid {
                    text: f.fval.clone(),
                    ty: None,
                    range: true,
                },
                Err(IntError::Syntax) => Lit::Number,
            },
            Some(Val::Sval(s)) => Lit::Str(s.sval.clone()),
            _ => Lit::Opaque,
        }
    }

    /// The constant after a cast; `int` to `int` keeps the value, and the key conversion
    /// then checks the key type's range.
    fn cast(self, to: Cast) -> Lit {
        match (self, to) {
            (lit @ (Lit::Null | Lit::Invalid { .. } | Lit::Opaque), _) => lit,
            (Lit::Int(value), Cast::Int(_)) => Lit::Int(value),
            (Lit::Str(text), Cast::Int(width)) => match parse_pg_int(&text) {
                Ok(value) => Lit::Int(value),
                Err(error) => Lit::Invalid {
                    text,
                    ty: Some(int_name(width)),
                    range: error == IntError::Range,
                },
            },
            (Lit::Int(value), Cast::Text) => Lit::Str(value.to_string()),
            (Lit::Str(text), Cast::Text) => Lit::Str(text),
            (Lit::Str(text), Cast::Uuid) => match parse_uuid(&text) {
                Some(bytes) => Lit::Uuid(bytes),
                None => Lit::Invalid {
                    text,
                    ty: Some("uuid"),
                    range: false,
                },
            },
            (Lit::Uuid(bytes), Cast::Uuid) => Lit::Uuid(bytes),
            _ => Lit::Opaque,
        }
    }
}

fn int_name(width: u8) -> &'static str {
    match width {
        2 => "int2",
        4 => "int4",
        _ => "int8",
    }
}

fn int_key(value: i64, table: &Table) -> Result<KeyValue, String> {
    let key = match table.key_type {
        KeyType::Int2 => i16::try_from(value).ok().map(KeyValue::Int2),
        KeyType::Int4 => i32::try_from(value).ok().map(KeyValue::Int4),
        KeyType::Int8 => Some(KeyValue::Int8(value)),
        KeyType::Text | KeyType::Uuid => {
            return Err(bad_value(
                &value.to_string(),
                table.key_type.as_str(),
                false,
                table,
            ))
        }
    };
    key.ok_or_else(|| bad_value(&value.to_string(), table.key_type.as_str(), true, table))
}

/// A string constant as the key type's input function reads it.
fn str_key(text: &str, table: &Table) -> Result<KeyValue, String> {
    let ty = table.key_type.as_str();
    match table.key_type {
        KeyType::Text => Ok(KeyValue::Text(text.as_bytes().to_vec())),
        KeyType::Uuid => parse_uuid(text)
            .map(KeyValue::Uuid)
            .ok_or_else(|| bad_value(text, ty, false, table)),
        KeyType::Int2 | KeyType::Int4 | KeyType::Int8 => match parse_pg_int(text) {
            Ok(value) => int_key(value, table),
            Err(error) => Err(bad_value(text, ty, error == IntError::Range, table)),
        },
    }
}

/// The refusal text for a constant that is not a valid key value.
fn bad_value(text: &str, ty: &str, range: bool, table: &Table) -> String {
    const SHOWN_CHARS_MAX: usize = 64;
    let shown: String = text.chars().take(SHOWN_CHARS_MAX).collect();
    let ellipsis = if shown.len() < text.len() { "..." } else { "" };
    let (name, key) = (&table.name, &table.key);
    if range {
        format!("value {shown}{ellipsis} is out of range for {ty} {name}.{key}")
    } else {
        format!("value '{shown}{ellipsis}' is not a valid {ty} for {name}.{key}")
    }
}

/// Why a text is not an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntError {
    Syntax,
    Range,
}

/// The whitespace PostgreSQL's input functions skip: C `isspace` in the C locale.
fn is_pg_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// An integer as `int8in` reads it (PostgreSQL 16+, `pg_strtoint64_safe` in
/// src/backend/utils/adt/numutils.c): surrounding whitespace, a sign, decimal digits or a
/// `0x`/`0o`/`0b` prefix, and single `_` between digits (not first in a decimal).
pub(crate) fn parse_pg_int(text: &str) -> Result<i64, IntError> {
    let trimmed = text.trim_matches(is_pg_space);
    let (negative, unsigned) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let prefix = unsigned.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits) = match prefix.as_deref() {
        Some("0x") => (16, &unsigned[2..]),
        Some("0o") => (8, &unsigned[2..]),
        Some("0b") => (2, &unsigned[2..]),
        _ => (10, unsigned),
    };
    let magnitude = digits_value(digits, radix)?;
    if negative {
        0i64.checked_sub_unsigned(magnitude).ok_or(IntError::Range)
    } else {
        i64::try_from(magnitude).map_err(|_| IntError::Range)
    }
}

/// The value of the digits of an integer (with `_` separators) in `radix`.
fn digits_value(digits: &str, radix: u32) -> Result<u64, IntError> {
    let bytes = digits.as_bytes();
    if bytes.is_empty() {
        return Err(IntError::Syntax);
    }
    let is_digit = |byte: u8| char::from(byte).is_digit(radix);
    let mut value: u64 = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        if byte == b'_' {
            let first_of_decimal = radix == 10 && at == 0;
            if first_of_decimal || !bytes.get(at + 1).is_some_and(|&next| is_digit(next)) {
                return Err(IntError::Syntax);
            }
            continue;
        }
        let digit = char::from(byte).to_digit(radix).ok_or(IntError::Syntax)?;
        value = value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(u64::from(digit)))
            .filter(|v| *v <= 1 << 63)
            .ok_or(IntError::Range)?;
    }
    Ok(value)
}

/// A uuid as `uuid_in` reads it (`string_to_uuid` in src/backend/utils/adt/uuid.c): 32
/// hex digits, optionally in braces, with an optional `-` after any group of four.
pub(crate) fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let mut rest = text.as_bytes();
    let braces = rest.first() == Some(&b'{');
    if braces {
        rest = &rest[1..];
    }
    let mut bytes = [0u8; 16];
    for (at, byte) in bytes.iter_mut().enumerate() {
        let high = char::from(*rest.first()?).to_digit(16)?;
        let low = char::from(*rest.get(1)?).to_digit(16)?;
        *byte = ((high << 4) | low) as u8;
        rest = &rest[2..];
        if at % 2 == 1 && at < 15 && rest.first() == Some(&b'-') {
            rest = &rest[1..];
        }
    }
    if braces {
        rest = rest.strip_prefix(b"}")?;
    }
    rest.is_empty().then_some(bytes)
}

/// The elements of a one-dimensional array literal such as `{1, "two", NULL}` (`None`
/// for a NULL element), as `array_in` reads them for types whose delimiter is `,`.
/// Anything else (several dimensions, explicit bounds, malformed text) is `None`: the
/// caller then uses no key and lets the server judge the literal.
pub(crate) fn parse_array_literal(text: &str) -> Option<Vec<Option<String>>> {
    let body = text.trim_start_matches(is_pg_space).strip_prefix('{')?;
    let mut chars = body.chars().peekable();
    let mut elements = Vec::new();
    skip_pg_space(&mut chars);
    if chars.peek() == Some(&'}') {
        chars.next();
    } else {
        loop {
            skip_pg_space(&mut chars);
            elements.push(array_element(&mut chars)?);
            skip_pg_space(&mut chars);
            match chars.next()? {
                ',' => {}
                '}' => break,
                _ => return None,
            }
        }
    }
    chars.all(is_pg_space).then_some(elements)
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

fn skip_pg_space(chars: &mut Chars<'_>) {
    while chars.next_if(|c| is_pg_space(*c)).is_some() {}
}

/// One array element, quoted or not; stops before the `,` or `}` after it.
fn array_element(chars: &mut Chars<'_>) -> Option<Option<String>> {
    if chars.next_if_eq(&'"').is_some() {
        let mut element = String::new();
        loop {
            match chars.next()? {
                '\\' => element.push(chars.next()?),
                '"' => return Some(Some(element)),
                c => element.push(c),
            }
        }
    }
    let mut element = String::new();
    let mut kept = 0; // Length without trailing unescaped whitespace.
    let mut escaped = false;
    while let Some(&c) = chars.peek() {
        match c {
            ',' | '}' => break,
            '"' | '{' => return None,
            '\\' => {
                chars.next();
                element.push(chars.next()?);
                kept = element.len();
                escaped = true;
            }
            c => {
                chars.next();
                element.push(c);
                if !is_pg_space(c) {
                    kept = element.len();
                }
            }
        }
    }
    element.truncate(kept);
    match (element.is_empty(), escaped) {
        (true, false) => None,
        _ if !escaped && element.eq_ignore_ascii_case("null") => Some(None),
        _ => Some(Some(element)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard_map::{Group, Partition, PartitionState, Shard, ShardId};

    use StatementKind::{Ddl, Delete, Insert, Other, Select, Transaction, Update};

    const UUID: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    const UUID_BYTES: [u8; 16] = [
        0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a,
        0x11,
    ];

    /// Sharded: accounts(id int8), orders(account_id int8), small(k int2), medium(k int4),
    /// users(name text), devices(uid uuid). Everything else is unsharded.
    pub(super) fn map() -> ShardMap {
        let mut map = ShardMap::default();
        map.shards.insert(
            ShardId(0),
            Shard {
                id: ShardId(0),
                primary: "localhost:5432".into(),
                replicas: vec![],
            },
        );
        let tables = [
            ("accounts", "id", KeyType::Int8),
            ("orders", "account_id", KeyType::Int8),
            ("small", "k", KeyType::Int2),
            ("medium", "k", KeyType::Int4),
            ("users", "name", KeyType::Text),
            ("devices", "uid", KeyType::Uuid),
        ];
        for (name, key, key_type) in tables {
            let group = Group::default_name(key_type, 8);
            map.groups.entry(group.clone()).or_insert_with(|| Group {
                name: group.clone(),
                key_type,
                partitions: vec![
                    Partition {
                        owner: ShardId(0),
                        state: PartitionState::Stable,
                    };
                    8
                ],
            });
            let table = Table {
                name: name.into(),
                key: key.into(),
                key_type,
                group,
            };
            map.tables.insert(name.into(), table);
        }
        map.check_invariants().expect("the test map is valid");
        map
    }

    fn i8(v: i64) -> KeySource {
        KeySource::Const(KeyValue::Int8(v))
    }
    fn i4(v: i32) -> KeySource {
        KeySource::Const(KeyValue::Int4(v))
    }
    fn i2(v: i16) -> KeySource {
        KeySource::Const(KeyValue::Int2(v))
    }
    fn text(v: &str) -> KeySource {
        KeySource::Const(KeyValue::Text(v.as_bytes().to_vec()))
    }
    fn uuid() -> KeySource {
        KeySource::Const(KeyValue::Uuid(UUID_BYTES))
    }
    fn p(n: u16) -> KeySource {
        KeySource::Param(n)
    }
    fn pa(n: u16) -> KeySource {
        KeySource::ParamArray(n)
    }
    /// A target with these keys.
    fn t(table: &'static str, keys: Vec<KeySource>) -> (&'static str, Option<Vec<KeySource>>) {
        (table, Some(keys))
    }
    /// A target without keys: every shard.
    fn all(table: &'static str) -> (&'static str, Option<Vec<KeySource>>) {
        (table, None)
    }

    type Expected = (
        &'static str,
        StatementKind,
        Vec<(&'static str, Option<Vec<KeySource>>)>,
        Option<&'static str>,
    );

    fn check(cases: Vec<Expected>) {
        let map = map();
        for (sql, kind, targets, refusal) in cases {
            let analysis = analyse(sql, &map).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let got: Vec<_> = analysis
                .targets
                .iter()
                .map(|t| (t.table.as_str(), t.keys.clone()))
                .collect();
            assert_eq!(analysis.kind, kind, "kind of {sql}");
            assert_eq!(got, targets, "targets of {sql}");
            match (&analysis.refusal, refusal) {
                (None, None) => {}
                (Some(got), Some(want)) => assert!(got.contains(want), "{sql}: {got:?}"),
                (got, want) => panic!("{sql}: refusal {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn select_keys_from_equalities_casts_and_params() {
        check(vec![
            ("SELECT * FROM accounts WHERE id = 1", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM accounts WHERE 1 = id", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM accounts WHERE id = $1", Select, vec![t("accounts", vec![p(1)])], None),
            ("SELECT * FROM accounts WHERE id = $2::bigint", Select, vec![t("accounts", vec![p(2)])], None),
            ("SELECT * FROM accounts WHERE $3::int8 = id", Select, vec![t("accounts", vec![p(3)])], None),
            ("SELECT * FROM accounts WHERE id = 5::int8", Select, vec![t("accounts", vec![i8(5)])], None),
            ("SELECT * FROM accounts WHERE id = '5'", Select, vec![t("accounts", vec![i8(5)])], None),
            ("SELECT * FROM accounts WHERE id = '5'::text::int8", Select, vec![t("accounts", vec![i8(5)])], None),
            ("SELECT * FROM accounts WHERE id = ' 0x1F '", Select, vec![t("accounts", vec![i8(31)])], None),
            ("SELECT * FROM accounts WHERE id = 1_000_000_000_000", Select, vec![t("accounts", vec![i8(1_000_000_000_000)])], None),
            ("SELECT * FROM accounts WHERE id = -9223372036854775808", Select, vec![t("accounts", vec![i8(i64::MIN)])], None),
            ("SELECT * FROM accounts WHERE id = 0", Select, vec![t("accounts", vec![i8(0)])], None),
            ("SELECT * FROM accounts WHERE id::bigint = 7", Select, vec![t("accounts", vec![i8(7)])], None),
            ("SELECT * FROM accounts WHERE id OPERATOR(pg_catalog.=) 3", Select, vec![t("accounts", vec![i8(3)])], None),
            ("SELECT * FROM accounts WHERE id = 1 FOR UPDATE", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM accounts TABLESAMPLE SYSTEM (10) WHERE id = 1", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM ACCOUNTS WHERE ID = 1", Select, vec![t("accounts", vec![i8(1)])], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn shapes_that_do_not_pin_the_key() {
        check(vec![
            ("SELECT * FROM accounts", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE abs(id) = 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id > 5", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id <> 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = other_col", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = 1 + 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE NOT id = 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = 1 OR name = 'x'", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = NULL", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = 5.5", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = 5::numeric", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id::int4 = 7", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id::text = '7'", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = $1::text::int8", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = $70000", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id NOT IN (1, 2)", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id IN (1, other_col)", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id <> ALL('{1}')", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = ANY('{}')", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id = ANY('{{1},{2}}')", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id IS NOT DISTINCT FROM 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE id BETWEEN 1 AND 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts WHERE \"ID\" = 1", Select, vec![all("accounts")], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn and_or_in_and_any() {
        check(vec![
            ("SELECT * FROM accounts WHERE status = 'x' AND id = 3 AND created > now()", Select, vec![t("accounts", vec![i8(3)])], None),
            ("SELECT * FROM accounts WHERE id IN (1, 2) AND id = 2", Select, vec![t("accounts", vec![i8(2)])], None),
            ("SELECT * FROM accounts WHERE id = 1 OR id = 2", Select, vec![t("accounts", vec![i8(1), i8(2)])], None),
            ("SELECT * FROM accounts WHERE (id = 1 AND x = 2) OR id IN (2, 3) OR id = 1", Select, vec![t("accounts", vec![i8(1), i8(2), i8(3)])], None),
            ("SELECT * FROM accounts WHERE id IN (1, 2, 2, $1)", Select, vec![t("accounts", vec![i8(1), i8(2), p(1)])], None),
            ("SELECT * FROM accounts WHERE id IN (1, NULL)", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM accounts WHERE id = ANY($1)", Select, vec![t("accounts", vec![pa(1)])], None),
            ("SELECT * FROM accounts WHERE id = ANY($1::int8[])", Select, vec![t("accounts", vec![pa(1)])], None),
            ("SELECT * FROM accounts WHERE id = ANY('{1,2}'::int8[])", Select, vec![t("accounts", vec![i8(1), i8(2)])], None),
            ("SELECT * FROM accounts WHERE id = ANY(' { 1 , \"2\", NULL } ')", Select, vec![t("accounts", vec![i8(1), i8(2)])], None),
            ("SELECT * FROM accounts WHERE id = ANY(ARRAY[4, $2])", Select, vec![t("accounts", vec![i8(4), p(2)])], None),
            ("SELECT * FROM accounts WHERE id = ANY(ARRAY['4', '5']::bigint[])", Select, vec![t("accounts", vec![i8(4), i8(5)])], None),
            ("SELECT * FROM users WHERE name = ANY('{ann, \"b,c\", \"NULL\"}')", Select, vec![t("users", vec![text("ann"), text("b,c"), text("NULL")])], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn names_aliases_and_qualifiers() {
        check(vec![
            ("SELECT * FROM accounts a WHERE a.id = 1", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM accounts WHERE accounts.id = 1", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM public.accounts WHERE public.accounts.id = 1", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT * FROM accounts AS a WHERE accounts.id = 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts a WHERE b.id = 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts a (x, y) WHERE id = 1", Select, vec![all("accounts")], None),
            ("SELECT * FROM \"Accounts\" WHERE id = 1", Select, vec![], None),
            ("SELECT * FROM plans WHERE id = 1", Select, vec![], None),
            ("SELECT 1", Select, vec![], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn constants_of_every_key_type() {
        check(vec![
            ("SELECT * FROM medium WHERE k = 7", Select, vec![t("medium", vec![i4(7)])], None),
            ("SELECT * FROM medium WHERE k = -2147483648", Select, vec![t("medium", vec![i4(i32::MIN)])], None),
            ("SELECT * FROM small WHERE k = '12'", Select, vec![t("small", vec![i2(12)])], None),
            ("SELECT * FROM small WHERE k::int8 = 12", Select, vec![t("small", vec![i2(12)])], None),
            ("SELECT * FROM users WHERE name = 'Ann'", Select, vec![t("users", vec![text("Ann")])], None),
            ("SELECT * FROM users WHERE name = E'a\\tb'", Select, vec![t("users", vec![text("a\tb")])], None),
            ("SELECT * FROM users WHERE name = 5::text", Select, vec![t("users", vec![text("5")])], None),
            ("SELECT * FROM users WHERE name = 'Ann'::varchar", Select, vec![t("users", vec![text("Ann")])], None),
            ("SELECT * FROM users WHERE name = 'Ann'::varchar(2)", Select, vec![all("users")], None),
            ("SELECT * FROM devices WHERE uid = 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'", Select, vec![t("devices", vec![uuid()])], None),
            ("SELECT * FROM devices WHERE uid = '{a0eebc999c0b4ef8bb6d6bb9bd380a11}'::uuid", Select, vec![t("devices", vec![uuid()])], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn bad_constants_refuse_with_a_reason() {
        check(vec![
            ("SELECT * FROM accounts WHERE id = 'abc'", Select, vec![all("accounts")], Some("value 'abc' is not a valid int8 for accounts.id")),
            ("SELECT * FROM accounts WHERE id = 'abc'::int4", Select, vec![all("accounts")], Some("value 'abc' is not a valid int4 for accounts.id")),
            ("SELECT * FROM accounts WHERE id = 99999999999999999999", Select, vec![all("accounts")], Some("value 99999999999999999999 is out of range for int8 accounts.id")),
            ("SELECT * FROM accounts WHERE id = 1 AND id = '1__0'", Select, vec![t("accounts", vec![i8(1)])], Some("value '1__0' is not a valid int8")),
            ("SELECT * FROM medium WHERE k = 3000000000", Select, vec![all("medium")], Some("value 3000000000 is out of range for int4 medium.k")),
            ("SELECT * FROM small WHERE k = 40000", Select, vec![all("small")], Some("out of range for int2 small.k")),
            ("SELECT * FROM small WHERE k IN (1, '-40000')", Select, vec![all("small")], Some("out of range for int2 small.k")),
            ("SELECT * FROM users WHERE name = 5", Select, vec![all("users")], Some("value '5' is not a valid text for users.name")),
            ("SELECT * FROM devices WHERE uid = 'not-a-uuid'", Select, vec![all("devices")], Some("value 'not-a-uuid' is not a valid uuid for devices.uid")),
            ("SELECT * FROM accounts WHERE id = ANY('{1,x}')", Select, vec![all("accounts")], Some("value 'x' is not a valid int8")),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn subqueries_ctes_and_joins() {
        check(vec![
            ("SELECT * FROM accounts WHERE id IN (SELECT account_id FROM orders WHERE account_id = 3)", Select, vec![all("accounts"), t("orders", vec![i8(3)])], None),
            ("SELECT * FROM (SELECT * FROM accounts WHERE id = 4) s WHERE s.id = 5", Select, vec![t("accounts", vec![i8(4)])], None),
            ("SELECT (SELECT count(*) FROM orders WHERE account_id = 3) FROM plans", Select, vec![t("orders", vec![i8(3)])], None),
            ("SELECT * FROM accounts a WHERE EXISTS (SELECT 1 FROM orders o WHERE o.account_id = a.id) AND a.id = 4", Select, vec![t("accounts", vec![i8(4)]), all("orders")], None),
            ("SELECT * FROM plans p, LATERAL (SELECT * FROM accounts a WHERE a.id = p.x) s", Select, vec![all("accounts")], None),
            ("WITH a AS (SELECT * FROM accounts WHERE id = 6) SELECT * FROM a", Select, vec![t("accounts", vec![i8(6)])], None),
            ("WITH accounts AS (SELECT 1 AS id) SELECT * FROM accounts WHERE id = 1", Select, vec![], None),
            ("WITH accounts AS (SELECT * FROM accounts WHERE id = 2) SELECT * FROM accounts", Select, vec![t("accounts", vec![i8(2)])], None),
            ("WITH RECURSIVE accounts AS (SELECT 1 AS id UNION ALL SELECT id + 1 FROM accounts) SELECT * FROM accounts", Select, vec![], None),
            ("WITH d AS (DELETE FROM accounts WHERE id = 1 RETURNING *) SELECT * FROM d", Select, vec![t("accounts", vec![i8(1)])], None),
            ("SELECT id FROM accounts WHERE id = 1 UNION ALL SELECT account_id FROM orders WHERE account_id = 2", Select, vec![t("accounts", vec![i8(1)]), t("orders", vec![i8(2)])], None),
            ("SELECT * FROM accounts a JOIN plans p ON p.id = a.plan_id WHERE a.id = 9", Select, vec![t("accounts", vec![i8(9)])], None),
            ("SELECT * FROM accounts JOIN plans ON plans.pid = accounts.plan WHERE id = 9", Select, vec![t("accounts", vec![i8(9)])], None),
            ("SELECT * FROM accounts a JOIN orders o ON o.account_id = a.id WHERE a.id = 1", Select, vec![t("accounts", vec![i8(1)]), all("orders")], None),
            ("SELECT * FROM orders o JOIN accounts a ON a.id = 7 AND o.x = a.y", Select, vec![all("orders"), t("accounts", vec![i8(7)])], None),
            ("SELECT * FROM accounts a LEFT JOIN orders o ON o.account_id = 7", Select, vec![all("accounts"), all("orders")], None),
            ("SELECT * FROM accounts LEFT JOIN (plans JOIN tiers ON id = 5) ON true", Select, vec![all("accounts")], None),
            ("SELECT * FROM (accounts a JOIN plans p ON true) AS j WHERE id = 5", Select, vec![all("accounts")], None),
            ("SELECT * FROM accounts a, accounts b WHERE a.id = 1 AND b.id = 2", Select, vec![t("accounts", vec![i8(1)]), t("accounts", vec![i8(2)])], None),
            // An expression type the walk does not know (XMLELEMENT): the generic scan
            // still finds the table, without a key.
            ("SELECT xmlelement(name x, (SELECT name FROM users WHERE name = 'a'))", Select, vec![all("users")], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn update_and_delete() {
        check(vec![
            ("UPDATE accounts SET name = 'x' WHERE id = 1", Update, vec![t("accounts", vec![i8(1)])], None),
            ("UPDATE accounts a SET name = 'x' WHERE a.id = ANY($1)", Update, vec![t("accounts", vec![pa(1)])], None),
            ("UPDATE accounts SET name = 'x'", Update, vec![all("accounts")], None),
            ("UPDATE accounts SET name = p.n FROM plans p WHERE accounts.id = 2 AND p.id = accounts.plan", Update, vec![t("accounts", vec![i8(2)])], None),
            ("DELETE FROM accounts WHERE id IN ($1, $2, $3)", Delete, vec![t("accounts", vec![p(1), p(2), p(3)])], None),
            ("DELETE FROM accounts USING orders o WHERE o.account_id = accounts.id AND accounts.id = 5", Delete, vec![t("accounts", vec![i8(5)]), all("orders")], None),
            ("WITH accounts AS (SELECT 1) DELETE FROM accounts WHERE id = 3", Delete, vec![t("accounts", vec![i8(3)])], None),
            ("DELETE FROM accounts WHERE id = 'abc'", Delete, vec![all("accounts")], Some("not a valid int8")),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn insert() {
        check(vec![
            ("INSERT INTO accounts (id, name) VALUES (1, 'a')", Insert, vec![t("accounts", vec![i8(1)])], None),
            ("INSERT INTO accounts (name, id) VALUES ('a', $2), ('b', $4)", Insert, vec![t("accounts", vec![p(2), p(4)])], None),
            ("INSERT INTO accounts (id, name) VALUES (1, 'a'), (1, 'b')", Insert, vec![t("accounts", vec![i8(1), i8(1)])], None),
            ("INSERT INTO accounts (id, name) VALUES (1, 'a'), (DEFAULT, 'b')", Insert, vec![all("accounts")], None),
            ("INSERT INTO accounts (id) VALUES (NULL)", Insert, vec![all("accounts")], None),
            ("INSERT INTO accounts (id) SELECT account_id FROM orders WHERE account_id = 3", Insert, vec![all("accounts"), t("orders", vec![i8(3)])], None),
            ("INSERT INTO accounts (id, name) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET name = excluded.name", Insert, vec![t("accounts", vec![i8(1)])], None),
            ("INSERT INTO devices (uid) VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid)", Insert, vec![t("devices", vec![uuid()])], None),
            ("INSERT INTO plans (id) VALUES (1)", Insert, vec![], None),
            ("INSERT INTO accounts VALUES (1, 'a')", Insert, vec![all("accounts")], Some("INSERT into sharded table accounts needs a column list")),
            ("INSERT INTO accounts (name) VALUES ('a')", Insert, vec![all("accounts")], Some("INSERT into sharded table accounts must set its key column id")),
            ("INSERT INTO accounts DEFAULT VALUES", Insert, vec![all("accounts")], Some("must set its key column id")),
            ("INSERT INTO accounts (id) VALUES ('x')", Insert, vec![all("accounts")], Some("value 'x' is not a valid int8 for accounts.id")),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn copy() {
        let copy = |from_stdin| StatementKind::Copy { from_stdin };
        check(vec![
            ("COPY accounts (name, id) FROM STDIN", copy(true), vec![all("accounts")], None),
            ("COPY accounts FROM STDIN", copy(true), vec![all("accounts")], Some("COPY into sharded table accounts needs a column list")),
            ("COPY accounts (name) FROM STDIN", copy(true), vec![all("accounts")], Some("must include its key column id")),
            ("COPY accounts (id) FROM '/tmp/x'", copy(false), vec![all("accounts")], Some("must read FROM STDIN")),
            ("COPY accounts TO STDOUT", copy(false), vec![all("accounts")], None),
            ("COPY (SELECT * FROM accounts WHERE id = 1) TO STDOUT", copy(false), vec![t("accounts", vec![i8(1)])], None),
            ("COPY plans FROM STDIN", copy(true), vec![], None),
        ]);
    }

    #[test]
    #[rustfmt::skip] // One case per line reads as a table.
    fn other_statements() {
        check(vec![
            ("BEGIN", Transaction, vec![], None),
            ("COMMIT", Transaction, vec![], None),
            ("SAVEPOINT s", Transaction, vec![], None),
            ("ROLLBACK TO SAVEPOINT s", Transaction, vec![], None),
            ("CREATE TABLE plans (id int)", Ddl, vec![], None),
            ("ALTER TABLE accounts ADD COLUMN x int", Ddl, vec![all("accounts")], None),
            ("DROP TABLE accounts, plans", Ddl, vec![all("accounts")], None),
            ("TRUNCATE accounts", Ddl, vec![all("accounts")], None),
            ("SELECT * INTO newtab FROM accounts WHERE id = 1", Ddl, vec![t("accounts", vec![i8(1)])], None),
            ("SET search_path = x", Other, vec![], None),
            ("LOCK TABLE accounts", Other, vec![all("accounts")], None),
            ("EXPLAIN SELECT * FROM accounts WHERE id = 1", Other, vec![t("accounts", vec![i8(1)])], None),
            ("PREPARE q AS SELECT * FROM accounts WHERE id = $1", Other, vec![t("accounts", vec![p(1)])], None),
            ("MERGE INTO accounts a USING plans p ON a.id = p.id WHEN MATCHED THEN DELETE", Other, vec![all("accounts")], None),
            ("CREATE VIEW v AS WITH accounts AS (SELECT 1) SELECT * FROM accounts", Ddl, vec![all("accounts")], Some("cannot tell whether \"accounts\" names the sharded table")),
            ("SELECT * FROM accouns WHER id = 1", Other, vec![], None),
            ("", Other, vec![], None),
            ("SELECT * FROM accounts WHERE id = 1; UPDATE orders SET x = 1 WHERE account_id = 2", Select, vec![t("accounts", vec![i8(1)]), t("orders", vec![i8(2)])], None),
            ("BEGIN; INSERT INTO accounts (id) VALUES (1); COMMIT", Transaction, vec![t("accounts", vec![i8(1)])], None),
        ]);
    }

    fn only_target(sql: &str) -> TableTarget {
        let analysis = analyse(sql, &map()).expect("analyses");
        assert_eq!(analysis.targets.len(), 1, "{sql}: {analysis:?}");
        analysis.targets[0].clone()
    }

    #[test]
    fn insert_and_copy_report_key_position_rows_and_writes() {
        // (sql, insert_key_column, insert_rows, writes, updates_key)
        let cases = [
            (
                "INSERT INTO accounts (name, id) VALUES ('a', 1), ('b', 2)",
                Some(1),
                2,
                true,
                false,
            ),
            (
                "INSERT INTO accounts (id) SELECT 1",
                Some(0),
                0,
                true,
                false,
            ),
            (
                "INSERT INTO accounts (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2",
                Some(0),
                1,
                true,
                true,
            ),
            (
                "COPY accounts (name, id) FROM STDIN",
                Some(1),
                0,
                true,
                false,
            ),
            ("COPY accounts (id) TO STDOUT", None, 0, false, false),
            (
                "UPDATE accounts SET id = 2 WHERE id = 1",
                None,
                0,
                true,
                true,
            ),
            (
                "UPDATE accounts SET (name, id) = ('x', 2) WHERE id = 1",
                None,
                0,
                true,
                true,
            ),
            (
                "UPDATE accounts SET name = 'x' WHERE id = 1",
                None,
                0,
                true,
                false,
            ),
            ("DELETE FROM accounts WHERE id = 1", None, 0, true, false),
            ("SELECT * FROM accounts WHERE id = 1", None, 0, false, false),
        ];
        for (sql, column, rows, writes, updates_key) in cases {
            let target = only_target(sql);
            assert_eq!(target.insert_key_column, column, "{sql}");
            assert_eq!(target.insert_rows, rows, "{sql}");
            assert_eq!(target.writes, writes, "{sql}");
            assert_eq!(target.updates_key, updates_key, "{sql}");
        }
    }

    #[test]
    fn a_tree_too_deep_for_pg_query_is_an_error_not_a_syntax_error() {
        let sql = format!(
            "SELECT id FROM accounts WHERE name = a{}",
            " || a".repeat(60)
        );

        let result = analyse(&sql, &map());
        let cached = AnalysisCache::new(4).get_or_analyse(&sql, &map());

        assert!(
            matches!(result, Err(Error::Parse(pg_query::Error::Decode(_)))),
            "{result:?}"
        );
        assert_eq!(cached.kind, StatementKind::Other);
        assert!(cached.targets.is_empty());
        let refusal = cached.refusal.as_deref().unwrap_or_default();
        assert!(refusal.contains("nested too deeply"), "{refusal}");
    }

    #[test]
    fn integers_are_read_as_int8in_reads_them() {
        let cases: [(&str, Result<i64, IntError>); 17] = [
            ("0", Ok(0)),
            (" \t-42\n", Ok(-42)),
            ("+7", Ok(7)),
            ("0x1F", Ok(31)),
            ("0X_1f", Ok(31)),
            ("-0o17", Ok(-15)),
            ("0b101", Ok(5)),
            ("1_000", Ok(1000)),
            ("007", Ok(7)),
            ("9223372036854775807", Ok(i64::MAX)),
            ("-9223372036854775808", Ok(i64::MIN)),
            ("9223372036854775808", Err(IntError::Range)),
            ("_1", Err(IntError::Syntax)),
            ("1_", Err(IntError::Syntax)),
            ("0x", Err(IntError::Syntax)),
            ("- 5", Err(IntError::Syntax)),
            ("\u{a0}5", Err(IntError::Syntax)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_pg_int(text), expected, "{text:?}");
        }
    }

    #[test]
    fn uuids_are_read_as_uuid_in_reads_them() {
        let valid = [
            UUID,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ];
        let invalid = [
            "",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0e-ebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ];
        for text in valid {
            assert_eq!(parse_uuid(text), Some(UUID_BYTES), "{text:?}");
        }
        for text in invalid {
            assert_eq!(parse_uuid(text), None, "{text:?}");
        }
    }

    #[test]
    fn array_literals() {
        let some = |items: &[&str]| Some(items.iter().map(|s| Some(s.to_string())).collect());
        let cases: Vec<(&str, Option<Vec<Option<String>>>)> = vec![
            ("{1,2}", some(&["1", "2"])),
            (" { 1 , 2 } ", some(&["1", "2"])),
            ("{}", Some(vec![])),
            ("{\"a,b\",\"c\\\"d\"}", some(&["a,b", "c\"d"])),
            ("{a\\ ,b}", some(&["a ", "b"])),
            (
                "{NULL,null,\"NULL\"}",
                Some(vec![None, None, Some("NULL".into())]),
            ),
            ("{{1},{2}}", None),
            ("[1:2]={1,2}", None),
            ("{1,,2}", None),
            ("{1,2", None),
            ("{1,2}x", None),
            ("{\"a\"b}", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_array_literal(text), expected, "{text:?}");
        }
    }

    #[test]
    fn cache_hits_by_text_and_epoch() {
        // Arrange
        let cache = AnalysisCache::new(4);
        let mut map = map();
        let sql = "SELECT * FROM accounts WHERE id = 1";
        let expected = analyse(sql, &map).expect("analyses");

        // Act
        let first = cache.get_or_analyse(sql, &map);
        let second = cache.get_or_analyse(sql, &map);
        map.epoch = Epoch(1);
        map.tables.remove("accounts");
        let after_change = cache.get_or_analyse(sql, &map);

        // Check
        assert_eq!(*first, expected);
        assert!(Arc::ptr_eq(&first, &second), "second lookup is a cache hit");
        assert!(
            after_change.targets.is_empty(),
            "a new epoch is analysed anew"
        );
        assert_eq!(cache.len(), 1, "the old epoch's entries are gone");
    }

    #[test]
    fn cache_is_bounded_and_skips_long_texts() {
        let cache = AnalysisCache::new(3);
        let map = map();
        for i in 0..10 {
            let sql = format!("SELECT * FROM accounts WHERE id = {i}");
            assert_eq!(
                cache.get_or_analyse(&sql, &map).targets[0].keys,
                Some(vec![i8(i)])
            );
            assert!(cache.len() <= 3, "len {} after {i}", cache.len());
        }
        let long = format!(
            "SELECT * FROM accounts WHERE id = 1 /* {} */",
            "x".repeat(AnalysisCache::TEXT_BYTES_MAX)
        );
        let before = cache.len();
        assert_eq!(cache.get_or_analyse(&long, &map).targets.len(), 1);
        assert_eq!(cache.len(), before, "long text is not stored");

        let disabled = AnalysisCache::new(0);
        assert_eq!(disabled.get_or_analyse("SELECT 1", &map).kind, Select);
        assert!(disabled.is_empty());
    }
}

#[cfg(test)]
mod point_read_tests {
    use super::tests::map;
    use super::*;

    fn point_read(sql: &str) -> bool {
        analyse(sql, &map()).expect("analyses").point_read
    }

    #[test]
    fn a_select_by_one_key_is_a_point_read() {
        assert!(point_read("SELECT * FROM accounts WHERE id = 1"));
        assert!(point_read("SELECT price FROM users WHERE name = 'gold'"));
        assert!(point_read("SELECT balance FROM accounts WHERE id = $1"));
        assert!(point_read(
            "SELECT id, balance FROM accounts WHERE id = 7 AND balance > 0 ORDER BY id LIMIT 1"
        ));
    }

    #[test]
    fn anything_that_may_vary_or_read_more_is_not() {
        for sql in [
            "SELECT * FROM accounts WHERE id IN (1, 2)",
            "SELECT * FROM accounts",
            "SELECT * FROM accounts WHERE id = 1 OR balance > 5",
            "SELECT now(), * FROM accounts WHERE id = 1",
            "SELECT CURRENT_TIMESTAMP, * FROM accounts WHERE id = 1",
            "SELECT * FROM accounts WHERE id = 1 FOR UPDATE",
            "SELECT * FROM accounts a JOIN plain p ON true WHERE a.id = 1",
            "SELECT * FROM accounts WHERE id = 1 AND balance > (SELECT max(x) FROM plain)",
            "WITH a AS (SELECT * FROM accounts WHERE id = 1) SELECT * FROM a",
            "SELECT * FROM accounts WHERE id = 1; SELECT 1",
            "SELECT * FROM accounts WHERE id = 1 UNION SELECT * FROM accounts WHERE id = 1",
            "SELECT * FROM accounts TABLESAMPLE SYSTEM (10) WHERE id = 1",
            "SELECT * INTO copy FROM accounts WHERE id = 1",
            "SELECT balance, 'now'::timestamptz FROM accounts WHERE id = 1",
            "SELECT * FROM accounts WHERE id = 1 AND 'Today '::date > '2020-01-01'",
            "UPDATE accounts SET balance = 1 WHERE id = 1",
            "SELECT * FROM plain WHERE id = 1",
        ] {
            assert!(!point_read(sql), "{sql}");
        }
    }
}
