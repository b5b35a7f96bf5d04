//! `plan`: how a SELECT that must run on every shard is split into shard SQL and a merge.
//!
//! A SELECT on a hash-sharded table without a usable shard key runs on every shard
//! ("scatter"); the client must still see exactly what one big PostgreSQL would return.
//! [`plan`] reads the statement with PostgreSQL's own grammar (pg_query) and decides:
//!
//! - plain rows: shards run the statement with LIMIT pushed down (`offset + limit`), the
//!   proxy concatenates ([`Merge::Concat`]) or k-way merges the sorted streams
//!   ([`Merge::Sorted`], compared with [`crate::merge::compare`]), then applies OFFSET/LIMIT;
//! - aggregates, GROUP BY, HAVING, DISTINCT: shards return partial rows (group keys and
//!   partial aggregates) and PostgreSQL itself computes the client's result from them
//!   ([`Merge::Final`], [`FinalPlan::final_sql`]), so types, NULLs, numeric scales and
//!   output names are PostgreSQL's own.
//!
//! It never guesses: a construct it cannot split correctly (window functions, joins,
//! subqueries, other aggregates, ...) is a [`Refusal`] naming it. The planner does no IO;
//! without the catalog it cannot see user-defined aggregates or set-returning functions,
//! so only the built-in ones are recognised by name.

use std::collections::HashMap;

use pg_query::protobuf::{
    self, a_const::Val, node::Node as N, AConst, ColumnRef, FuncCall, LimitOption, RangeVar,
    ResTarget, SelectStmt, SetOperation, SortByDir, SortByNulls,
};

/// Why a scattered SELECT cannot be answered; shown to the client with SQLSTATE 0A000.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// How to run a SELECT on every shard and merge the results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScatterPlan {
    /// The SQL every shard runs. Parameters `$n` keep the client's numbering.
    pub shard_sql: String,
    /// Trailing columns of each shard row the client must not see (sort keys the select
    /// list lacks). Always 0 for [`Merge::Final`].
    pub hidden_columns: usize,
    pub merge: Merge,
    /// The plain (non-aggregate) functions the query calls, lower case, as
    /// written (maybe schema-qualified). The planner has no catalog: the
    /// caller must refuse the plan if any of them is in fact an aggregate,
    /// returns a set, or is volatile (each shard would compute its own).
    pub functions: Vec<String>,
}

/// How the proxy combines the shards' rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// Shard rows concatenated (in shard order); the proxy applies offset/limit.
    ///
    /// Negative LIMIT/OFFSET values (constants or parameters) make the shards raise
    /// PostgreSQL's own errors (2201W, 2201X), so the proxy only sees valid bounds; a NULL
    /// parameter means no LIMIT, or OFFSET 0.
    Concat {
        limit: Option<Bound>,
        offset: Option<Bound>,
    },
    /// Every shard returns rows sorted by `keys`; the proxy does a streaming k-way merge,
    /// then offset/limit (same rules as `Concat`).
    Sorted {
        keys: Vec<SortKey>,
        limit: Option<Bound>,
        offset: Option<Bound>,
    },
    /// Aggregates / GROUP BY / HAVING / DISTINCT: shards return partial rows; PostgreSQL
    /// computes the final result from them (the proxy runs [`FinalPlan::final_sql`] on one
    /// shard connection).
    Final(FinalPlan),
}

/// A LIMIT or OFFSET value. `LIMIT ALL` and `LIMIT NULL` are no bound at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Const(i64),
    /// The value of parameter `$n` (1-based); NULL means no bound (LIMIT) or 0 (OFFSET).
    Param(u16),
}

/// One key of the k-way merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub column: SortColumn,
    pub descending: bool,
    pub nulls_first: bool,
}

/// Where a sort key's value is in a shard row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortColumn {
    /// The i-th (0-based) column the client sees.
    Visible(usize),
    /// The j-th (0-based) of the hidden trailing columns.
    Hidden(usize),
}

/// The second half of a cross-shard aggregate: PostgreSQL SQL over the partial rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalPlan {
    /// The final SELECT with placeholders: [`PARTIALS`] for the FROM item and
    /// `__sl_agg<k>__` for aggregate `k`; partial column `j` is `__sl_c<j>__`.
    template: String,
    /// The partial aggregates, in the order of their columns after the group keys.
    aggregates: Vec<PartialAggregate>,
    /// Columns of every shard row: group keys first, then the aggregates' columns.
    partial_columns: usize,
}

/// Placeholder of the partial rows' relation in [`FinalPlan::template`]. Names starting
/// `__sl_` are reserved: a statement containing the text is refused.
const PARTIALS: &str = "__sl_partials__";
const RESERVED: &str = "__sl_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AggKind {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

/// One distinct aggregate call of the original query and where its partials are.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PartialAggregate {
    kind: AggKind,
    /// The shard column of the partial (`avg`: the sum; its count follows).
    column: usize,
}

/// Aggregates PostgreSQL ships that the planner cannot split; named so they are refused
/// rather than mistaken for ordinary functions and run per shard.
const OTHER_AGGREGATES: &[&str] = &[
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "json_agg",
    "jsonb_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_object_agg",
    "jsonb_object_agg",
    "json_object_agg_strict",
    "jsonb_object_agg_strict",
    "json_object_agg_unique",
    "jsonb_object_agg_unique",
    "json_object_agg_unique_strict",
    "jsonb_object_agg_unique_strict",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "range_agg",
    "range_intersect_agg",
    "xmlagg",
    "any_value",
    "grouping",
];

/// Set-returning functions PostgreSQL ships (the common ones).
const SET_RETURNING: &[&str] = &[
    "generate_series",
    "generate_subscripts",
    "unnest",
    "regexp_matches",
    "regexp_split_to_table",
    "string_to_table",
    "json_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "json_each",
    "json_each_text",
    "jsonb_each",
    "jsonb_each_text",
    "json_object_keys",
    "jsonb_object_keys",
    "json_populate_recordset",
    "jsonb_populate_recordset",
    "json_to_recordset",
    "jsonb_to_recordset",
    "jsonb_path_query",
    "jsonb_path_query_tz",
    "ts_stat",
    "ts_debug",
    "pg_listening_channels",
    "pg_options_to_table",
];

fn refuse<T>(message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(message.into()))
}

/// The suffix of every refusal about a construct.
const EVERY_SHARD: &str = "in a query that runs on every shard";

/// Plans `sql`, one SELECT on one sharded table, for running on every shard.
pub fn plan(sql: &str) -> Result<ScatterPlan, Refusal> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|e| Refusal(format!("cannot plan a query for every shard: {e}")))?;
    let stmts = &parsed.protobuf.stmts;
    if stmts.len() != 1 {
        return refuse(format!(
            "multiple statements are not supported {EVERY_SHARD}"
        ));
    }
    let Some(N::SelectStmt(select)) = stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref()) else {
        return refuse("only SELECT can run on every shard");
    };
    if sql.to_ascii_lowercase().contains(RESERVED) {
        return refuse(format!(
            "names containing {RESERVED} are reserved {EVERY_SHARD}"
        ));
    }
    check_shape(select)?;
    let mut scan = Scan::default();
    for target in &select.target_list {
        scan.target(target)?;
    }
    if let Some(w) = &select.where_clause {
        scan.expr(w, Clause::Where)?;
    }
    for g in &select.group_clause {
        if let Some(N::GroupingSet(_)) = &g.node {
            return refuse(format!(
                "GROUPING SETS, ROLLUP and CUBE are not supported {EVERY_SHARD}"
            ));
        }
        scan.expr(g, Clause::GroupBy)?;
    }
    if let Some(h) = &select.having_clause {
        scan.expr(h, Clause::Other)?;
    }
    for s in &select.sort_clause {
        scan.expr(s, Clause::Other)?;
    }
    let grouped = scan.aggregates
        || !select.group_clause.is_empty()
        || select.having_clause.is_some()
        || !select.distinct_clause.is_empty();
    let mut plan = if grouped {
        plan_final(select)?
    } else {
        plan_rows(select)?
    };
    plan.functions = scan.functions.into_iter().collect();
    Ok(plan)
}

/// Functions whose value depends on when each shard's transaction started.
const TIME_DEPENDENT: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "timeofday",
];

/// Refuses the statement-level shapes that cannot be scattered.
fn check_shape(select: &SelectStmt) -> Result<(), Refusal> {
    if select.op != SetOperation::SetopNone as i32 {
        return refuse(format!(
            "UNION, INTERSECT and EXCEPT are not supported {EVERY_SHARD}"
        ));
    }
    if select.with_clause.is_some() {
        return refuse(format!("WITH queries are not supported {EVERY_SHARD}"));
    }
    if select.into_clause.is_some() {
        return refuse(format!("SELECT INTO is not supported {EVERY_SHARD}"));
    }
    if !select.locking_clause.is_empty() {
        return refuse(format!(
            "FOR UPDATE and FOR SHARE are not supported {EVERY_SHARD}"
        ));
    }
    if !select.values_lists.is_empty() {
        return refuse(format!("VALUES is not supported {EVERY_SHARD}"));
    }
    if !select.window_clause.is_empty() {
        return refuse(format!("window functions are not supported {EVERY_SHARD}"));
    }
    if select.limit_option == LimitOption::WithTies as i32 {
        return refuse(format!(
            "FETCH ... WITH TIES is not supported {EVERY_SHARD}"
        ));
    }
    if select.group_distinct {
        return refuse(format!("GROUP BY DISTINCT is not supported {EVERY_SHARD}"));
    }
    if select.distinct_clause.iter().any(|d| d.node.is_some()) {
        return refuse(format!("DISTINCT ON is not supported {EVERY_SHARD}"));
    }
    match select.from_clause.as_slice() {
        [one] => match &one.node {
            Some(N::RangeVar(r)) if !r.inh => refuse(format!(
                "SELECT ... FROM ONLY is not supported {EVERY_SHARD}"
            )),
            Some(N::RangeVar(_)) => Ok(()),
            Some(N::JoinExpr(_)) => refuse(format!("joins are not supported {EVERY_SHARD}")),
            Some(N::RangeSubselect(_)) => refuse(format!(
                "subqueries in FROM are not supported {EVERY_SHARD}"
            )),
            Some(N::RangeFunction(_)) => {
                refuse(format!("functions in FROM are not supported {EVERY_SHARD}"))
            }
            Some(N::RangeTableSample(_)) => {
                refuse(format!("TABLESAMPLE is not supported {EVERY_SHARD}"))
            }
            other => refuse(format!(
                "FROM item {} is not supported {EVERY_SHARD}",
                kind_name(other.as_ref())
            )),
        },
        [] => refuse("a query without FROM does not need every shard"),
        _ => refuse(format!(
            "joins and more than one FROM item are not supported {EVERY_SHARD}"
        )),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Clause {
    Target,
    Where,
    GroupBy,
    Other,
}

/// The first pass over every expression: refuses what no plan supports and notes
/// whether the query aggregates.
#[derive(Default)]
struct Scan {
    aggregates: bool,
    functions: std::collections::BTreeSet<String>,
}

impl Scan {
    fn target(&mut self, target: &protobuf::Node) -> Result<(), Refusal> {
        match &target.node {
            Some(N::ResTarget(t)) => {
                if !t.indirection.is_empty() {
                    return refuse(format!(
                        "select-list indirection is not supported {EVERY_SHARD}"
                    ));
                }
                match &t.val {
                    Some(v) => self.expr(v, Clause::Target),
                    None => refuse("select-list entry without a value"),
                }
            }
            other => refuse(format!(
                "select-list entry {} is not supported {EVERY_SHARD}",
                kind_name(other.as_ref())
            )),
        }
    }

    fn expr(&mut self, node: &protobuf::Node, clause: Clause) -> Result<(), Refusal> {
        self.walk(node, clause, false)
    }

    fn walk(
        &mut self,
        node: &protobuf::Node,
        clause: Clause,
        in_aggregate: bool,
    ) -> Result<(), Refusal> {
        let mut inside = in_aggregate;
        if let Some(N::FuncCall(call)) = &node.node {
            match classify_call(call)? {
                Call::Aggregate(_) => {
                    if in_aggregate {
                        return refuse(format!(
                            "nested aggregate calls are not supported {EVERY_SHARD}"
                        ));
                    }
                    if matches!(clause, Clause::Where | Clause::GroupBy) {
                        return refuse(format!(
                            "aggregates in WHERE or GROUP BY are not supported {EVERY_SHARD}"
                        ));
                    }
                    self.aggregates = true;
                    inside = true;
                }
                Call::SetReturning(name) => {
                    return refuse(format!(
                        "set-returning function {name} is not supported {EVERY_SHARD}"
                    ))
                }
                Call::Plain => {
                    let name = func_name(call);
                    if TIME_DEPENDENT.contains(&name.as_str()) {
                        return refuse(format!(
                            "{name}() is not supported {EVERY_SHARD}: each shard's transaction \
                             has its own time"
                        ));
                    }
                    self.functions.insert(name);
                }
            }
        }
        if let Some(N::SqlvalueFunction(f)) = &node.node {
            use protobuf::SqlValueFunctionOp as Op;
            let time = !matches!(
                Op::try_from(f.op),
                Ok(Op::SvfopCurrentRole
                    | Op::SvfopCurrentUser
                    | Op::SvfopUser
                    | Op::SvfopSessionUser
                    | Op::SvfopCurrentCatalog
                    | Op::SvfopCurrentSchema)
            );
            if time {
                return refuse(format!(
                    "CURRENT_DATE, CURRENT_TIME(STAMP) and LOCALTIME(STAMP) are not supported \
                     {EVERY_SHARD}: each shard's transaction has its own time"
                ));
            }
        }
        if let Some(N::CollateClause(c)) = &node.node {
            let name: Vec<&str> = c
                .collname
                .iter()
                .filter_map(|n| match &n.node {
                    Some(N::String(s)) => Some(s.sval.as_str()),
                    _ => None,
                })
                .collect();
            if !matches!(
                name.as_slice(),
                ["C" | "POSIX"] | ["pg_catalog", "C" | "POSIX"]
            ) {
                return refuse(format!(
                    "COLLATE \"{}\" is not supported {EVERY_SHARD} (the proxy merges text in \
                     byte order: only COLLATE \"C\" or \"POSIX\")",
                    name.join(".")
                ));
            }
        }
        for child in children(node)? {
            self.walk(child, clause, inside)?;
        }
        Ok(())
    }
}

enum Call {
    Aggregate(AggKind),
    SetReturning(String),
    Plain,
}

/// What a function call is, refusing window calls and aggregates that cannot be split.
fn classify_call(call: &FuncCall) -> Result<Call, Refusal> {
    let name = func_name(call);
    if call.over.is_some() {
        return refuse(format!(
            "window functions are not supported {EVERY_SHARD} ({name} OVER ...)"
        ));
    }
    if call.agg_within_group {
        return refuse(format!(
            "ordered-set aggregate {name} is not supported {EVERY_SHARD}"
        ));
    }
    let kind = match name.as_str() {
        "count" => Some(AggKind::Count),
        "sum" => Some(AggKind::Sum),
        "min" => Some(AggKind::Min),
        "max" => Some(AggKind::Max),
        "avg" => Some(AggKind::Avg),
        _ => None,
    };
    let aggregate_like = call.agg_star
        || call.agg_distinct
        || !call.agg_order.is_empty()
        || call.agg_filter.is_some();
    let Some(kind) = kind else {
        if OTHER_AGGREGATES.contains(&name.as_str()) || aggregate_like {
            return refuse(format!(
                "aggregate function {name} is not supported {EVERY_SHARD}"
            ));
        }
        if SET_RETURNING.contains(&name.as_str()) {
            return Ok(Call::SetReturning(name));
        }
        return Ok(Call::Plain);
    };
    if call.agg_distinct {
        return refuse(format!(
            "{name}(DISTINCT ...) is not supported {EVERY_SHARD}"
        ));
    }
    if call.agg_filter.is_some() {
        return refuse(format!(
            "{name}(...) FILTER (...) is not supported {EVERY_SHARD}"
        ));
    }
    if !call.agg_order.is_empty() {
        return refuse(format!(
            "ORDER BY inside {name}(...) is not supported {EVERY_SHARD}"
        ));
    }
    if call.func_variadic {
        return refuse(format!(
            "VARIADIC {name}(...) is not supported {EVERY_SHARD}"
        ));
    }
    let arity_ok = match kind {
        AggKind::Count => call.agg_star && call.args.is_empty() || call.args.len() == 1,
        _ => !call.agg_star && call.args.len() == 1,
    };
    if !arity_ok
        || call
            .args
            .iter()
            .any(|a| matches!(a.node, Some(N::NamedArgExpr(_))))
    {
        return refuse(format!(
            "aggregate {name} with these arguments is not supported {EVERY_SHARD}"
        ));
    }
    Ok(Call::Aggregate(kind))
}

/// The function's name, without a `pg_catalog.` qualification; a name in another schema
/// keeps it (so `myschema.count` is not taken for the built-in).
fn func_name(call: &FuncCall) -> String {
    let parts: Vec<&str> = call
        .funcname
        .iter()
        .filter_map(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect();
    match parts.as_slice() {
        ["pg_catalog", name] => (*name).to_owned(),
        _ => parts.join("."),
    }
}

/// The variant name of a node, for messages.
fn kind_name(node: Option<&N>) -> String {
    match node {
        None => "(empty)".to_owned(),
        Some(n) => {
            let debug = format!("{n:?}");
            debug.split('(').next().unwrap_or("?").to_owned()
        }
    }
}

/// The expression children of the expression node kinds the planner understands; any
/// other kind is refused, so nothing can hide in a node type it does not know.
fn children(node: &protobuf::Node) -> Result<Vec<&protobuf::Node>, Refusal> {
    fn boxed<'a>(out: &mut Vec<&'a protobuf::Node>, n: &'a Option<Box<protobuf::Node>>) {
        if let Some(n) = n {
            out.push(n);
        }
    }
    let mut out = Vec::new();
    match &node.node {
        None
        | Some(
            N::AConst(_)
            | N::ColumnRef(_)
            | N::ParamRef(_)
            | N::SqlvalueFunction(_)
            | N::String(_)
            | N::AStar(_),
        ) => {}
        Some(N::AExpr(e)) => {
            boxed(&mut out, &e.lexpr);
            boxed(&mut out, &e.rexpr);
        }
        Some(N::BoolExpr(e)) => out.extend(&e.args),
        Some(N::FuncCall(c)) => {
            out.extend(&c.args);
            out.extend(&c.agg_order);
            boxed(&mut out, &c.agg_filter);
        }
        Some(N::TypeCast(c)) => boxed(&mut out, &c.arg),
        Some(N::CollateClause(c)) => boxed(&mut out, &c.arg),
        Some(N::CaseExpr(c)) => {
            boxed(&mut out, &c.arg);
            out.extend(&c.args);
            boxed(&mut out, &c.defresult);
        }
        Some(N::CaseWhen(w)) => {
            boxed(&mut out, &w.expr);
            boxed(&mut out, &w.result);
        }
        Some(N::CoalesceExpr(c)) => out.extend(&c.args),
        Some(N::MinMaxExpr(m)) => out.extend(&m.args),
        Some(N::NullTest(t)) => boxed(&mut out, &t.arg),
        Some(N::BooleanTest(t)) => boxed(&mut out, &t.arg),
        Some(N::AArrayExpr(a)) => out.extend(&a.elements),
        Some(N::RowExpr(r)) => out.extend(&r.args),
        Some(N::List(l)) => out.extend(&l.items),
        Some(N::AIndirection(i)) => {
            boxed(&mut out, &i.arg);
            out.extend(&i.indirection);
        }
        Some(N::AIndices(i)) => {
            boxed(&mut out, &i.lidx);
            boxed(&mut out, &i.uidx);
        }
        Some(N::NamedArgExpr(a)) => boxed(&mut out, &a.arg),
        Some(N::SortBy(s)) => {
            if !s.use_op.is_empty() || s.sortby_dir == SortByDir::SortbyUsing as i32 {
                return refuse(format!("ORDER BY ... USING is not supported {EVERY_SHARD}"));
            }
            boxed(&mut out, &s.node);
        }
        Some(N::SubLink(_)) => {
            return refuse(format!("subqueries are not supported {EVERY_SHARD}"))
        }
        Some(N::GroupingFunc(_)) => {
            return refuse(format!("GROUPING() is not supported {EVERY_SHARD}"))
        }
        Some(other) => {
            return refuse(format!(
                "expressions of kind {} are not supported {EVERY_SHARD}",
                kind_name(Some(other))
            ))
        }
    }
    Ok(out)
}

/// Mutable twin of [`children`], for the kinds [`children`] accepted.
fn children_mut(node: &mut protobuf::Node) -> Vec<&mut protobuf::Node> {
    fn boxed<'a>(out: &mut Vec<&'a mut protobuf::Node>, n: &'a mut Option<Box<protobuf::Node>>) {
        if let Some(n) = n {
            out.push(n);
        }
    }
    let mut out = Vec::new();
    match &mut node.node {
        Some(N::AExpr(e)) => {
            boxed(&mut out, &mut e.lexpr);
            boxed(&mut out, &mut e.rexpr);
        }
        Some(N::BoolExpr(e)) => out.extend(&mut e.args),
        Some(N::FuncCall(c)) => {
            out.extend(&mut c.args);
            out.extend(&mut c.agg_order);
            boxed(&mut out, &mut c.agg_filter);
        }
        Some(N::TypeCast(c)) => boxed(&mut out, &mut c.arg),
        Some(N::CollateClause(c)) => boxed(&mut out, &mut c.arg),
        Some(N::CaseExpr(c)) => {
            boxed(&mut out, &mut c.arg);
            out.extend(&mut c.args);
            boxed(&mut out, &mut c.defresult);
        }
        Some(N::CaseWhen(w)) => {
            boxed(&mut out, &mut w.expr);
            boxed(&mut out, &mut w.result);
        }
        Some(N::CoalesceExpr(c)) => out.extend(&mut c.args),
        Some(N::MinMaxExpr(m)) => out.extend(&mut m.args),
        Some(N::NullTest(t)) => boxed(&mut out, &mut t.arg),
        Some(N::BooleanTest(t)) => boxed(&mut out, &mut t.arg),
        Some(N::AArrayExpr(a)) => out.extend(&mut a.elements),
        Some(N::RowExpr(r)) => out.extend(&mut r.args),
        Some(N::List(l)) => out.extend(&mut l.items),
        Some(N::AIndirection(i)) => {
            boxed(&mut out, &mut i.arg);
            out.extend(&mut i.indirection);
        }
        Some(N::AIndices(i)) => {
            boxed(&mut out, &mut i.lidx);
            boxed(&mut out, &mut i.uidx);
        }
        Some(N::NamedArgExpr(a)) => boxed(&mut out, &mut a.arg),
        Some(N::SortBy(s)) => boxed(&mut out, &mut s.node),
        _ => {}
    }
    out
}

/// Whether a node is an expression on its own (one that can be deparsed as a select-list
/// entry), as opposed to a part of one (a `CASE` arm, an index, a list).
fn is_expression(node: &protobuf::Node) -> bool {
    matches!(
        &node.node,
        Some(
            N::AConst(_)
                | N::ColumnRef(_)
                | N::ParamRef(_)
                | N::SqlvalueFunction(_)
                | N::AExpr(_)
                | N::BoolExpr(_)
                | N::FuncCall(_)
                | N::TypeCast(_)
                | N::CollateClause(_)
                | N::CaseExpr(_)
                | N::CoalesceExpr(_)
                | N::MinMaxExpr(_)
                | N::NullTest(_)
                | N::BooleanTest(_)
                | N::AArrayExpr(_)
                | N::RowExpr(_)
                | N::AIndirection(_)
        )
    )
}

fn node(n: N) -> protobuf::Node {
    protobuf::Node { node: Some(n) }
}

fn string_node(s: &str) -> protobuf::Node {
    node(N::String(protobuf::String { sval: s.to_owned() }))
}

fn column_ref(name: &str) -> protobuf::Node {
    node(N::ColumnRef(ColumnRef {
        fields: vec![string_node(name)],
        location: -1,
    }))
}

fn int_const(value: i32) -> protobuf::Node {
    node(N::AConst(AConst {
        isnull: false,
        location: -1,
        val: Some(Val::Ival(protobuf::Integer { ival: value })),
    }))
}

fn res_target(name: &str, val: protobuf::Node) -> protobuf::Node {
    node(N::ResTarget(Box::new(ResTarget {
        name: name.to_owned(),
        indirection: vec![],
        val: Some(Box::new(val)),
        location: -1,
    })))
}

fn deparse_select(select: &SelectStmt) -> Result<String, Refusal> {
    N::SelectStmt(Box::new(select.clone()))
        .deparse(pg_query::DeparseOptions::default())
        .map_err(|e| Refusal(format!("cannot write the query for the shards: {e}")))
}

/// The text of one expression as PostgreSQL's deparser writes it, which ignores
/// token positions: two expressions with the same text are the same expression.
fn expr_text(expr: &protobuf::Node) -> Result<String, Refusal> {
    let select = SelectStmt {
        target_list: vec![res_target("", expr.clone())],
        limit_option: LimitOption::Default as i32,
        op: SetOperation::SetopNone as i32,
        ..SelectStmt::default()
    };
    let text = deparse_select(&select)?;
    Ok(text.strip_prefix("SELECT ").unwrap_or(&text).to_owned())
}

/// One expression parsed from text (the planner's own, never client text).
fn parse_expr(text: &str) -> Result<protobuf::Node, Refusal> {
    let parsed = pg_query::parse(&format!("SELECT {text}"), pg_query::ParserOptions::DEFAULT)
        .map_err(|e| Refusal(format!("internal error: cannot parse {text}: {e}")))?;
    let val = parsed
        .protobuf
        .stmts
        .into_iter()
        .next()
        .and_then(|s| s.stmt)
        .and_then(|s| s.node)
        .and_then(|n| match n {
            N::SelectStmt(s) => s.target_list.into_iter().next(),
            _ => None,
        })
        .and_then(|t| match t.node {
            Some(N::ResTarget(t)) => t.val,
            _ => None,
        });
    val.map(|v| *v)
        .ok_or_else(|| Refusal(format!("internal error: {text} is not an expression")))
}

/// The name PostgreSQL gives an unaliased select-list entry (`FigureColname` in
/// parse_target.c), with its strength: 2 a real name, 1 a fallback, 0 none.
fn figure_colname(node: &protobuf::Node) -> (String, u8) {
    let unnamed = ("?column?".to_owned(), 0);
    match &node.node {
        Some(N::ColumnRef(c)) => match c.fields.last().and_then(|f| f.node.as_ref()) {
            Some(N::String(s)) => (s.sval.clone(), 2),
            _ => unnamed,
        },
        Some(N::AIndirection(i)) => {
            match i.indirection.iter().rev().find_map(|f| match &f.node {
                Some(N::String(s)) => Some(s.sval.clone()),
                _ => None,
            }) {
                Some(name) => (name, 2),
                None => i.arg.as_deref().map_or(unnamed, figure_colname),
            }
        }
        Some(N::FuncCall(f)) => match f.funcname.last().and_then(|n| n.node.as_ref()) {
            Some(N::String(s)) => (s.sval.clone(), 2),
            _ => unnamed,
        },
        Some(N::AExpr(e)) if e.kind == protobuf::AExprKind::AexprNullif as i32 => {
            ("nullif".to_owned(), 2)
        }
        Some(N::TypeCast(c)) => {
            let inner = c.arg.as_deref().map_or(unnamed.clone(), figure_colname);
            if inner.1 > 1 {
                return inner;
            }
            match c
                .type_name
                .as_ref()
                .and_then(|t| t.names.last())
                .and_then(|n| n.node.as_ref())
            {
                Some(N::String(s)) => (s.sval.clone(), 1),
                _ => inner,
            }
        }
        Some(N::CollateClause(c)) => c.arg.as_deref().map_or(unnamed, figure_colname),
        Some(N::CaseExpr(c)) => {
            let inner = c.defresult.as_deref().map_or(unnamed, figure_colname);
            if inner.1 > 1 {
                inner
            } else {
                ("case".to_owned(), 1)
            }
        }
        Some(N::AArrayExpr(_)) => ("array".to_owned(), 2),
        Some(N::RowExpr(_)) => ("row".to_owned(), 2),
        Some(N::CoalesceExpr(_)) => ("coalesce".to_owned(), 2),
        Some(N::MinMaxExpr(m)) => {
            let name = if m.op == protobuf::MinMaxOp::IsGreatest as i32 {
                "greatest"
            } else {
                "least"
            };
            (name.to_owned(), 2)
        }
        Some(N::SqlvalueFunction(f)) => {
            use protobuf::SqlValueFunctionOp as Op;
            let name = match Op::try_from(f.op) {
                Ok(Op::SvfopCurrentDate) => "current_date",
                Ok(Op::SvfopCurrentTime | Op::SvfopCurrentTimeN) => "current_time",
                Ok(Op::SvfopCurrentTimestamp | Op::SvfopCurrentTimestampN) => "current_timestamp",
                Ok(Op::SvfopLocaltime | Op::SvfopLocaltimeN) => "localtime",
                Ok(Op::SvfopLocaltimestamp | Op::SvfopLocaltimestampN) => "localtimestamp",
                Ok(Op::SvfopCurrentRole) => "current_role",
                Ok(Op::SvfopCurrentUser) => "current_user",
                Ok(Op::SvfopUser) => "user",
                Ok(Op::SvfopSessionUser) => "session_user",
                Ok(Op::SvfopCurrentCatalog) => "current_catalog",
                Ok(Op::SvfopCurrentSchema) => "current_schema",
                _ => return unnamed,
            };
            (name.to_owned(), 2)
        }
        _ => unnamed,
    }
}

/// A select-list entry as the planner sees it.
struct Target {
    /// `*` or `t.*`: expands to columns the planner cannot count.
    star: bool,
    /// The output column name (alias, or PostgreSQL's figured name).
    name: String,
    val: protobuf::Node,
}

fn targets(select: &SelectStmt) -> Result<Vec<Target>, Refusal> {
    select
        .target_list
        .iter()
        .map(|t| {
            let Some(N::ResTarget(t)) = &t.node else {
                return refuse("select-list entry is not a target");
            };
            let Some(val) = t.val.as_deref() else {
                return refuse("select-list entry without a value");
            };
            let star = matches!(&val.node, Some(N::ColumnRef(c))
                if matches!(c.fields.last().and_then(|f| f.node.as_ref()), Some(N::AStar(_))));
            let name = if t.name.is_empty() {
                figure_colname(val).0
            } else {
                t.name.clone()
            };
            Ok(Target {
                star,
                name,
                val: val.clone(),
            })
        })
        .collect()
}

/// The single unqualified name of a bare column reference (`ORDER BY x`).
fn bare_name(node: &protobuf::Node) -> Option<&str> {
    match &node.node {
        Some(N::ColumnRef(c)) if c.fields.len() == 1 => match &c.fields[0].node {
            Some(N::String(s)) => Some(&s.sval),
            _ => None,
        },
        _ => None,
    }
}

/// An integer constant (`ORDER BY 2`, `GROUP BY 1`).
fn int_value(node: &protobuf::Node) -> Option<i64> {
    match &node.node {
        Some(N::AConst(AConst {
            val: Some(Val::Ival(i)),
            ..
        })) => Some(i64::from(i.ival)),
        _ => None,
    }
}

/// A LIMIT or OFFSET clause as a bound.
fn bound(clause: Option<&protobuf::Node>, what: &str) -> Result<Option<Bound>, Refusal> {
    let Some(n) = clause else { return Ok(None) };
    match &n.node {
        Some(N::AConst(c)) if c.isnull => Ok(None),
        Some(N::AConst(AConst {
            val: Some(Val::Ival(i)),
            ..
        })) => Ok(Some(Bound::Const(i64::from(i.ival)))),
        // Integers beyond int4 arrive as Float tokens.
        Some(N::AConst(AConst {
            val: Some(Val::Fval(f)),
            ..
        })) if f.fval.parse::<i64>().is_ok() => Ok(f.fval.parse().ok().map(Bound::Const)),
        Some(N::ParamRef(p)) => param_bound(p.number, what),
        Some(N::TypeCast(c)) => {
            let integer_type = c
                .type_name
                .as_ref()
                .and_then(|t| t.names.last())
                .and_then(|n| n.node.as_ref())
                .is_some_and(|n| matches!(n, N::String(s) if matches!(s.sval.as_str(), "int2" | "int4" | "int8")));
            match c.arg.as_deref().and_then(|a| a.node.as_ref()) {
                Some(N::ParamRef(p)) if integer_type => param_bound(p.number, what),
                _ => refuse(format!(
                    "{what} must be an integer constant or a parameter {EVERY_SHARD}"
                )),
            }
        }
        _ => refuse(format!(
            "{what} must be an integer constant or a parameter {EVERY_SHARD}"
        )),
    }
}

fn param_bound(number: i32, what: &str) -> Result<Option<Bound>, Refusal> {
    match u16::try_from(number) {
        Ok(n) if n > 0 => Ok(Some(Bound::Param(n))),
        _ => refuse(format!("{what} parameter ${number} is out of range")),
    }
}

// ---- plain rows: Concat and Sorted --------------------------------------------------------

fn plan_rows(select: &SelectStmt) -> Result<ScatterPlan, Refusal> {
    let limit = bound(select.limit_count.as_deref(), "LIMIT")?;
    let offset = bound(select.limit_offset.as_deref(), "OFFSET")?;
    let mut shard = select.clone();
    let outputs = targets(select)?;
    let mut keys = Vec::new();
    let mut hidden = Vec::new();
    for item in &select.sort_clause {
        let Some(N::SortBy(sort)) = &item.node else {
            return refuse("ORDER BY entry is not a sort key");
        };
        let Some(expr) = sort.node.as_deref() else {
            return refuse("ORDER BY entry without an expression");
        };
        let column = match sort_column(expr, &outputs)? {
            Some(i) => SortColumn::Visible(i),
            None => {
                let value = hidden_value(expr, &outputs)?;
                hidden.push(value);
                SortColumn::Hidden(hidden.len() - 1)
            }
        };
        let descending = sort.sortby_dir == SortByDir::SortbyDesc as i32;
        let nulls_first = match SortByNulls::try_from(sort.sortby_nulls) {
            Ok(SortByNulls::SortbyNullsFirst) => true,
            Ok(SortByNulls::SortbyNullsLast) => false,
            _ => descending,
        };
        keys.push(SortKey {
            column,
            descending,
            nulls_first,
        });
    }
    let hidden_columns = hidden.len();
    let ordinal = select.sort_clause.iter().any(|item| {
        matches!(&item.node, Some(N::SortBy(s)) if s.node.as_deref().and_then(int_value).is_some())
    });
    if hidden_columns > 0 && ordinal && outputs.iter().any(|t| t.star) {
        // The shards could not tell a position past the `*` columns from a hidden column.
        return refuse(format!(
            "ORDER BY positions together with * and computed sort keys are not supported {EVERY_SHARD}"
        ));
    }
    for (j, value) in hidden.into_iter().enumerate() {
        shard
            .target_list
            .push(res_target(&format!("__sl_h{j}__"), value));
    }
    let negative_const = [limit, offset]
        .iter()
        .any(|b| matches!(b, Some(Bound::Const(v)) if *v < 0));
    if !negative_const {
        let (count, offset_expr) = shard_bounds(limit, offset);
        shard.limit_count = count
            .map(|text| parse_expr(&text).map(Box::new))
            .transpose()?;
        shard.limit_offset = offset_expr
            .map(|text| parse_expr(&text).map(Box::new))
            .transpose()?;
        if shard.limit_count.is_none() {
            shard.limit_option = LimitOption::Default as i32;
        }
    }
    let shard_sql = deparse_select(&shard)?;
    let merge = if keys.is_empty() {
        Merge::Concat { limit, offset }
    } else {
        Merge::Sorted {
            keys,
            limit,
            offset,
        }
    };
    Ok(ScatterPlan {
        shard_sql,
        hidden_columns,
        merge,
        functions: Vec::new(),
    })
}

/// The shards' LIMIT and OFFSET texts for the client's non-negative-constant or
/// parameter bounds: LIMIT `offset + limit`, no OFFSET. A parameter stays referenced
/// (the shards get the client's Bind as is) and a negative parameter value still raises
/// PostgreSQL's own error on the shards: `OFFSET least($o, 0)` is 0 unless `$o` is
/// negative, and the LIMIT of a negative `$l` is `$l` itself.
fn shard_bounds(limit: Option<Bound>, offset: Option<Bound>) -> (Option<String>, Option<String>) {
    let offset_text = match offset {
        Some(Bound::Param(n)) => Some(format!("least(${n}::int8, 0)")),
        _ => None,
    };
    let added = match offset {
        None => None,
        Some(Bound::Const(o)) => Some(o.to_string()),
        Some(Bound::Param(n)) => Some(format!("coalesce(${n}::int8, 0)")),
    };
    let count = match limit {
        None => None,
        Some(Bound::Const(l)) => Some(match offset {
            None => l.to_string(),
            Some(Bound::Const(o)) => l.saturating_add(o).to_string(),
            Some(Bound::Param(_)) => format!("{l} + {}", added.clone().unwrap_or_default()),
        }),
        Some(Bound::Param(n)) => Some(match &added {
            None => format!("${n}::int8"),
            Some(o) => {
                format!("CASE WHEN ${n}::int8 < 0 THEN ${n}::int8 ELSE ${n}::int8 + {o} END")
            }
        }),
    };
    (count, offset_text)
}

/// The visible column an ORDER BY entry sorts by, when the planner can tell; `None`
/// means "add it as a hidden column".
fn sort_column(expr: &protobuf::Node, outputs: &[Target]) -> Result<Option<usize>, Refusal> {
    if let Some(k) = int_value(expr) {
        // An ordinal is an output position whatever `*` expands to; out of range, the
        // shards raise PostgreSQL's own error before sending a row.
        let star = outputs.iter().any(|t| t.star);
        return match usize::try_from(k) {
            Ok(k) if k >= 1 && (star || k <= outputs.len()) => Ok(Some(k - 1)),
            _ => refuse(format!("ORDER BY position {k} is not in select list")),
        };
    }
    let position = if let Some(name) = bare_name(expr) {
        // SQL92 rule: a bare name is an output column name first.
        outputs.iter().position(|t| !t.star && t.name == name)
    } else {
        let text = expr_text(expr)?;
        let mut found = None;
        for (i, t) in outputs.iter().enumerate() {
            if !t.star && is_expression(&t.val) && expr_text(&t.val)? == text {
                found = Some(i);
                break;
            }
        }
        found
    };
    Ok(position.filter(|&i| !outputs[..i].iter().any(|t| t.star)))
}

/// The value a hidden sort column must carry for an ORDER BY entry.
fn hidden_value(expr: &protobuf::Node, outputs: &[Target]) -> Result<protobuf::Node, Refusal> {
    if let Some(name) = bare_name(expr) {
        if let Some(t) = outputs.iter().find(|t| !t.star && t.name == name) {
            return Ok(t.val.clone());
        }
    }
    Ok(expr.clone())
}

// ---- aggregates: Final ----------------------------------------------------------------------

/// Rewrites expressions of the final query over the partial relation.
struct FinalRewrite {
    /// Text of each group key, by its column index.
    group_texts: Vec<String>,
    /// Text of each distinct aggregate call, with its index in `aggregates`.
    seen: HashMap<String, usize>,
    aggregates: Vec<(AggKind, Option<protobuf::Node>)>,
}

impl FinalRewrite {
    fn rewrite(&mut self, n: &mut protobuf::Node, what: &str) -> Result<(), Refusal> {
        if !self.group_texts.is_empty() && is_expression(n) {
            let text = expr_text(n)?;
            if let Some(i) = self.group_texts.iter().position(|g| *g == text) {
                *n = column_ref(&format!("__sl_c{i}__"));
                return Ok(());
            }
        }
        match &n.node {
            Some(N::FuncCall(call)) => {
                if let Call::Aggregate(kind) = classify_call(call)? {
                    let text = expr_text(n)?;
                    let k = match self.seen.get(&text) {
                        Some(&k) => k,
                        None => {
                            self.aggregates.push((kind, call.args.first().cloned()));
                            self.seen.insert(text, self.aggregates.len() - 1);
                            self.aggregates.len() - 1
                        }
                    };
                    *n = column_ref(&format!("__sl_agg{k}__"));
                    return Ok(());
                }
            }
            Some(N::ColumnRef(_)) => {
                let text = expr_text(n)?;
                return refuse(format!(
                    "column {text} must appear in GROUP BY or be used in an aggregate {EVERY_SHARD}"
                ));
            }
            Some(N::ParamRef(_)) => {
                return refuse(format!(
                    "parameters in {what} of a cross-shard aggregate are not supported"
                ));
            }
            _ => {}
        }
        for child in children_mut(n) {
            self.rewrite(child, what)?;
        }
        Ok(())
    }
}

fn plan_final(select: &SelectStmt) -> Result<ScatterPlan, Refusal> {
    let outputs = targets(select)?;
    if outputs.iter().any(|t| t.star) {
        return refuse(format!(
            "SELECT * with aggregates, GROUP BY or DISTINCT is not supported {EVERY_SHARD}"
        ));
    }
    let has_aggregates = {
        let mut scan = Scan::default();
        for t in &outputs {
            scan.expr(&t.val, Clause::Target)?;
        }
        if let Some(h) = &select.having_clause {
            scan.expr(h, Clause::Other)?;
        }
        for s in &select.sort_clause {
            scan.expr(s, Clause::Other)?;
        }
        scan.aggregates
    };
    // Group keys: GROUP BY entries, or for a plain DISTINCT the select list itself.
    let distinct_only =
        select.group_clause.is_empty() && !select.distinct_clause.is_empty() && !has_aggregates;
    let group_exprs: Vec<protobuf::Node> = if distinct_only {
        outputs.iter().map(|t| t.val.clone()).collect()
    } else {
        select
            .group_clause
            .iter()
            .map(|g| group_key(g, &outputs))
            .collect::<Result<_, _>>()?
    };
    let group_texts = group_exprs
        .iter()
        .map(expr_text)
        .collect::<Result<Vec<_>, _>>()?;
    let mut rewrite = FinalRewrite {
        group_texts,
        seen: HashMap::new(),
        aggregates: Vec::new(),
    };

    // The final query, over the partial relation.
    let mut fin = select.clone();
    fin.from_clause = vec![node(N::RangeVar(RangeVar {
        relname: PARTIALS.to_owned(),
        inh: true,
        relpersistence: "p".to_owned(),
        location: -1,
        ..RangeVar::default()
    }))];
    fin.where_clause = None;
    fin.group_clause = if distinct_only {
        Vec::new()
    } else {
        (0..group_exprs.len())
            .map(|i| column_ref(&format!("__sl_c{i}__")))
            .collect()
    };
    fin.target_list = Vec::new();
    for t in &outputs {
        let mut val = t.val.clone();
        rewrite.rewrite(&mut val, "the select list")?;
        fin.target_list.push(res_target(&t.name, val));
    }
    if let Some(h) = fin.having_clause.as_deref_mut() {
        rewrite.rewrite(h, "HAVING")?;
    }
    for item in &mut fin.sort_clause {
        let Some(N::SortBy(sort)) = &mut item.node else {
            return refuse("ORDER BY entry is not a sort key");
        };
        if !sort.use_op.is_empty() {
            return refuse(format!("ORDER BY ... USING is not supported {EVERY_SHARD}"));
        }
        let Some(expr) = sort.node.as_deref_mut() else {
            return refuse("ORDER BY entry without an expression");
        };
        // Ordinals and output names mean the same in the final query, which has the
        // same select list under the same names.
        let keeps_meaning = int_value(expr).is_some()
            || bare_name(expr).is_some_and(|n| outputs.iter().any(|t| t.name == n));
        if !keeps_meaning {
            rewrite.rewrite(expr, "ORDER BY")?;
        }
    }
    for (clause, what) in [
        (&select.limit_count, "LIMIT"),
        (&select.limit_offset, "OFFSET"),
    ] {
        if let Some(Bound::Param(_)) = bound(clause.as_deref(), what)? {
            return refuse(format!(
                "parameters in {what} of a cross-shard aggregate are not supported"
            ));
        }
    }
    let template = deparse_select(&fin)?;
    if template.matches(PARTIALS).count() != 1 {
        return refuse("internal error: the final query lost its partial rows");
    }

    // The shard query: group keys, then partial aggregates.
    let mut shard = select.clone();
    shard.target_list = group_exprs
        .iter()
        .map(|g| res_target("", g.clone()))
        .collect();
    let mut aggregates = Vec::new();
    for (kind, arg) in &rewrite.aggregates {
        aggregates.push(PartialAggregate {
            kind: *kind,
            column: shard.target_list.len(),
        });
        let call = |name: &str| match arg {
            None => aggregate_call("count", None),
            Some(a) => aggregate_call(name, Some(a.clone())),
        };
        match kind {
            AggKind::Count => shard.target_list.push(res_target("", call("count"))),
            AggKind::Sum => shard.target_list.push(res_target("", call("sum"))),
            AggKind::Min => shard.target_list.push(res_target("", call("min"))),
            AggKind::Max => shard.target_list.push(res_target("", call("max"))),
            AggKind::Avg => {
                shard.target_list.push(res_target("", call("sum")));
                shard.target_list.push(res_target("", call("count")));
            }
        }
    }
    if shard.target_list.is_empty() {
        // `SELECT 1 FROM t HAVING true`: one group, nothing to carry but its existence.
        shard
            .target_list
            .push(res_target("", aggregate_call("count", None)));
    }
    shard.group_clause = (0..group_exprs.len())
        .map(|i| int_const(i32::try_from(i + 1).unwrap_or(i32::MAX)))
        .collect();
    shard.having_clause = None;
    shard.sort_clause = Vec::new();
    shard.limit_count = None;
    shard.limit_offset = None;
    shard.limit_option = LimitOption::Default as i32;
    shard.distinct_clause = Vec::new();
    let partial_columns = shard.target_list.len();
    let shard_sql = deparse_select(&shard)?;
    Ok(ScatterPlan {
        shard_sql,
        hidden_columns: 0,
        functions: Vec::new(),
        merge: Merge::Final(FinalPlan {
            template,
            aggregates,
            partial_columns,
        }),
    })
}

/// The expression a GROUP BY entry groups by.
fn group_key(item: &protobuf::Node, outputs: &[Target]) -> Result<protobuf::Node, Refusal> {
    if let Some(k) = int_value(item) {
        return match usize::try_from(k)
            .ok()
            .filter(|&k| k >= 1 && k <= outputs.len())
        {
            Some(k) => Ok(outputs[k - 1].val.clone()),
            None => refuse(format!("GROUP BY position {k} is not in select list")),
        };
    }
    if let Some(name) = bare_name(item) {
        // PostgreSQL resolves a bare GROUP BY name to an input column first and to an
        // output name only when no column has it; without the catalog that is unknowable
        // when an output of that name is something else.
        // An output `t.a` for `GROUP BY a` is the same column either way (one table).
        let same_column = |t: &Target| {
            matches!(&t.val.node, Some(N::ColumnRef(c))
                if matches!(c.fields.last().and_then(|f| f.node.as_ref()),
                    Some(N::String(s)) if s.sval == name))
        };
        let mut key = None;
        for t in outputs.iter().filter(|t| t.name == name) {
            if same_column(t) {
                key.get_or_insert_with(|| t.val.clone());
            } else {
                return refuse(format!(
                    "GROUP BY {name} is ambiguous {EVERY_SHARD} (it names an output column \
                     that is not that column): group by the expression or its position"
                ));
            }
        }
        if let Some(key) = key {
            return Ok(key);
        }
    }
    Ok(item.clone())
}

fn aggregate_call(name: &str, arg: Option<protobuf::Node>) -> protobuf::Node {
    node(N::FuncCall(Box::new(FuncCall {
        funcname: vec![string_node(name)],
        agg_star: arg.is_none(),
        args: arg.into_iter().collect(),
        funcformat: protobuf::CoercionForm::CoerceExplicitCall as i32,
        location: -1,
        ..FuncCall::default()
    })))
}

impl FinalPlan {
    /// Columns every shard row has (group keys, then partial aggregates).
    pub fn partial_columns(&self) -> usize {
        self.partial_columns
    }

    /// The one statement that computes the client's result from all shards' partial rows:
    /// `column_types` are the type OIDs of the shard result columns (RowDescription),
    /// `rows` the partial rows in text format (`None` = NULL).
    pub fn final_sql(
        &self,
        column_types: &[u32],
        rows: &[Vec<Option<String>>],
    ) -> Result<String, Refusal> {
        if column_types.len() != self.partial_columns {
            return refuse(format!(
                "the shards returned {} columns where {} were planned",
                column_types.len(),
                self.partial_columns
            ));
        }
        let types = column_types
            .iter()
            .map(|&oid| {
                type_name(oid).ok_or_else(|| {
                    Refusal(format!(
                        "cannot merge values of type oid {oid} across shards"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut sql = self.template.clone();
        for (k, agg) in self.aggregates.iter().enumerate() {
            let c = agg.column;
            let ty = types[c];
            let text = match agg.kind {
                AggKind::Count => format!("(sum(__sl_c{c}__)::int8)"),
                AggKind::Sum => format!("(sum(__sl_c{c}__)::{ty})"),
                AggKind::Min => format!("(min(__sl_c{c}__)::{ty})"),
                AggKind::Max => format!("(max(__sl_c{c}__)::{ty})"),
                AggKind::Avg => {
                    let n = c + 1;
                    match ty {
                        "int8" | "numeric" => format!(
                            "(sum(__sl_c{c}__)::numeric / NULLIF(sum(__sl_c{n}__), 0)::numeric)"
                        ),
                        "float8" => {
                            format!("(sum(__sl_c{c}__) / NULLIF(sum(__sl_c{n}__), 0)::float8)")
                        }
                        // avg(real) sums in double precision; a real partial sum has
                        // already lost digits the original would keep.
                        other => {
                            return refuse(format!(
                                "avg over values summed as {other} is not supported {EVERY_SHARD}"
                            ))
                        }
                    }
                }
            };
            sql = sql.replace(&format!("__sl_agg{k}__"), &text);
        }
        let columns = (0..self.partial_columns)
            .map(|j| format!("__sl_c{j}__"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut from = String::new();
        if rows.is_empty() {
            from.push_str("(SELECT ");
            let nulls = types
                .iter()
                .map(|t| format!("NULL::{t}"))
                .collect::<Vec<_>>();
            from.push_str(&nulls.join(", "));
            from.push_str(" WHERE false)");
        } else {
            from.push_str("(VALUES ");
            for (i, row) in rows.iter().enumerate() {
                if row.len() != self.partial_columns {
                    return refuse(format!(
                        "a shard returned a row of {} columns where {} were planned",
                        row.len(),
                        self.partial_columns
                    ));
                }
                if i > 0 {
                    from.push_str(", ");
                }
                from.push('(');
                for (j, (value, ty)) in row.iter().zip(&types).enumerate() {
                    if j > 0 {
                        from.push_str(", ");
                    }
                    match value {
                        None => from.push_str("NULL"),
                        Some(v) => push_literal(&mut from, v),
                    }
                    from.push_str("::");
                    from.push_str(ty);
                }
                from.push(')');
            }
            from.push(')');
        }
        from.push_str(&format!(" AS __sl_p({columns})"));
        Ok(sql.replacen(PARTIALS, &from, 1))
    }
}

/// A string literal that means `value` whatever `standard_conforming_strings` is.
fn push_literal(out: &mut String, value: &str) {
    if value.contains('\\') {
        out.push_str("E'");
        for c in value.chars() {
            match c {
                '\'' => out.push_str("''"),
                '\\' => out.push_str("\\\\"),
                c => out.push(c),
            }
        }
    } else {
        out.push('\'');
        out.push_str(&value.replace('\'', "''"));
    }
    out.push('\'');
}

/// The SQL name of a type the final query can carry values of, by OID (pg_type.h).
fn type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        17 => "bytea",
        18 => "\"char\"",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        700 => "float4",
        701 => "float8",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1266 => "timetz",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_listed_and_time_and_collations_refused() {
        let p = plan("SELECT lower(owner), coalesce(x, 1) FROM t WHERE abs(id) > 3").unwrap();
        assert_eq!(p.functions, vec!["abs".to_owned(), "lower".to_owned()]);
        let p = plan("SELECT mysum(id) FROM t").unwrap();
        assert_eq!(p.functions, vec!["mysum".to_owned()]);
        for sql in [
            "SELECT id, now() FROM t",
            "SELECT DISTINCT current_timestamp FROM t",
            "SELECT id FROM t ORDER BY name COLLATE \"en-x-icu\"",
            "SELECT max(name COLLATE \"de_DE\") FROM t",
        ] {
            assert!(plan(sql).is_err(), "{sql}");
        }
        assert!(plan("SELECT id FROM t ORDER BY name COLLATE \"C\"").is_ok());
        assert!(plan("SELECT current_user, id FROM t").is_ok());
    }

    fn shard_sql(sql: &str) -> String {
        plan(sql).expect(sql).shard_sql
    }

    #[test]
    fn rows_push_limit_down_and_keep_order_by() {
        for (sql, expected_sql, expected_merge, hidden) in [
            (
                "SELECT a, b FROM t WHERE c > 1",
                "SELECT a, b FROM t WHERE c > 1",
                Merge::Concat {
                    limit: None,
                    offset: None,
                },
                0,
            ),
            (
                "SELECT a FROM t LIMIT 10 OFFSET 5",
                "SELECT a FROM t LIMIT 15",
                Merge::Concat {
                    limit: Some(Bound::Const(10)),
                    offset: Some(Bound::Const(5)),
                },
                0,
            ),
            (
                "SELECT a FROM t OFFSET 5",
                "SELECT a FROM t",
                Merge::Concat {
                    limit: None,
                    offset: Some(Bound::Const(5)),
                },
                0,
            ),
            (
                "SELECT a FROM t LIMIT ALL",
                "SELECT a FROM t",
                Merge::Concat {
                    limit: None,
                    offset: None,
                },
                0,
            ),
            (
                "SELECT a FROM t LIMIT NULL OFFSET 2",
                "SELECT a FROM t",
                Merge::Concat {
                    limit: None,
                    offset: Some(Bound::Const(2)),
                },
                0,
            ),
            (
                "SELECT a FROM t WHERE b = $1 LIMIT $2 OFFSET $3",
                "SELECT a FROM t WHERE b = $1 LIMIT CASE WHEN $2::int8 < 0 THEN $2::int8 ELSE $2::int8 + COALESCE($3::int8, 0) END OFFSET LEAST($3::int8, 0)",
                Merge::Concat {
                    limit: Some(Bound::Param(2)),
                    offset: Some(Bound::Param(3)),
                },
                0,
            ),
            (
                "SELECT a FROM t LIMIT $1::int4 OFFSET 3",
                "SELECT a FROM t LIMIT CASE WHEN $1::int8 < 0 THEN $1::int8 ELSE $1::int8 + 3 END",
                Merge::Concat {
                    limit: Some(Bound::Param(1)),
                    offset: Some(Bound::Const(3)),
                },
                0,
            ),
            (
                "SELECT a FROM t FETCH FIRST 3 ROWS ONLY",
                "SELECT a FROM t LIMIT 3",
                Merge::Concat {
                    limit: Some(Bound::Const(3)),
                    offset: None,
                },
                0,
            ),
            (
                // The shards still see every parameter of the client's Bind.
                "SELECT a FROM t OFFSET $1",
                "SELECT a FROM t OFFSET LEAST($1::int8, 0)",
                Merge::Concat {
                    limit: None,
                    offset: Some(Bound::Param(1)),
                },
                0,
            ),
            (
                "SELECT a FROM t LIMIT 4 OFFSET $1",
                "SELECT a FROM t LIMIT 4 + COALESCE($1::int8, 0) OFFSET LEAST($1::int8, 0)",
                Merge::Concat {
                    limit: Some(Bound::Const(4)),
                    offset: Some(Bound::Param(1)),
                },
                0,
            ),
            (
                "SELECT a FROM t LIMIT 5000000000 OFFSET 1",
                "SELECT a FROM t LIMIT 5000000001",
                Merge::Concat {
                    limit: Some(Bound::Const(5_000_000_000)),
                    offset: Some(Bound::Const(1)),
                },
                0,
            ),
            (
                // A negative constant stays, so the shards raise PostgreSQL's error.
                "SELECT a FROM t LIMIT 2 OFFSET -1",
                "SELECT a FROM t LIMIT 2 OFFSET -1",
                Merge::Concat {
                    limit: Some(Bound::Const(2)),
                    offset: Some(Bound::Const(-1)),
                },
                0,
            ),
            (
                "SELECT a, b FROM t ORDER BY b DESC, 1 LIMIT 3",
                "SELECT a, b FROM t ORDER BY b DESC, 1 LIMIT 3",
                Merge::Sorted {
                    keys: vec![
                        SortKey {
                            column: SortColumn::Visible(1),
                            descending: true,
                            nulls_first: true,
                        },
                        SortKey {
                            column: SortColumn::Visible(0),
                            descending: false,
                            nulls_first: false,
                        },
                    ],
                    limit: Some(Bound::Const(3)),
                    offset: None,
                },
                0,
            ),
            (
                "SELECT a AS x, b FROM t ORDER BY x NULLS FIRST, lower(b) DESC NULLS LAST",
                "SELECT a AS x, b, lower(b) AS __sl_h0__ FROM t ORDER BY x NULLS FIRST, lower(b) DESC NULLS LAST",
                Merge::Sorted {
                    keys: vec![
                        SortKey {
                            column: SortColumn::Visible(0),
                            descending: false,
                            nulls_first: true,
                        },
                        SortKey {
                            column: SortColumn::Hidden(0),
                            descending: true,
                            nulls_first: false,
                        },
                    ],
                    limit: None,
                    offset: None,
                },
                1,
            ),
            (
                // Equal expressions match the select list; `t.a` is not `a` to the planner.
                "SELECT a + 1, t.b FROM t ORDER BY a + 1, t.b, c",
                "SELECT a + 1, t.b, c AS __sl_h0__ FROM t ORDER BY a + 1, t.b, c",
                Merge::Sorted {
                    keys: vec![
                        SortKey {
                            column: SortColumn::Visible(0),
                            descending: false,
                            nulls_first: false,
                        },
                        SortKey {
                            column: SortColumn::Visible(1),
                            descending: false,
                            nulls_first: false,
                        },
                        SortKey {
                            column: SortColumn::Hidden(0),
                            descending: false,
                            nulls_first: false,
                        },
                    ],
                    limit: None,
                    offset: None,
                },
                1,
            ),
            (
                // After `*` positions of named outputs are unknown: hidden copies.
                "SELECT a, *, a * 2 AS d FROM t ORDER BY d, a",
                "SELECT a, *, a * 2 AS d, a * 2 AS __sl_h0__ FROM t ORDER BY d, a",
                Merge::Sorted {
                    keys: vec![
                        SortKey {
                            column: SortColumn::Hidden(0),
                            descending: false,
                            nulls_first: false,
                        },
                        SortKey {
                            column: SortColumn::Visible(0),
                            descending: false,
                            nulls_first: false,
                        },
                    ],
                    limit: None,
                    offset: None,
                },
                1,
            ),
        ] {
            let got = plan(sql).expect(sql);
            assert_eq!(got.shard_sql, expected_sql, "{sql}");
            assert_eq!(got.merge, expected_merge, "{sql}");
            assert_eq!(got.hidden_columns, hidden, "{sql}");
        }
    }

    #[test]
    fn aggregates_split_into_partials() {
        for (sql, expected_shard) in [
            ("SELECT count(*) FROM t", "SELECT count(*) FROM t"),
            (
                "SELECT a, count(*), sum(b), avg(c) FROM t WHERE d = $1 GROUP BY a",
                "SELECT a, count(*), sum(b), sum(c), count(c) FROM t WHERE d = $1 GROUP BY 1",
            ),
            (
                "SELECT DISTINCT a, b FROM t WHERE c > 0 ORDER BY 1 LIMIT 3",
                "SELECT a, b FROM t WHERE c > 0 GROUP BY 1, 2",
            ),
            (
                "SELECT a % 3 AS k, max(b) - min(b) FROM t GROUP BY 1 HAVING count(*) > 1 ORDER BY sum(b) DESC",
                "SELECT a % 3, max(b), min(b), count(*), sum(b) FROM t GROUP BY 1",
            ),
            ("SELECT 1 FROM t HAVING true", "SELECT count(*) FROM t"),
            (
                // `GROUP BY a` with an output `t.a`: the same column either way.
                "SELECT t.a, count(*) FROM t GROUP BY a",
                "SELECT t.a, count(*) FROM t GROUP BY 1",
            ),
            (
                "SELECT count(*), count(*) + 1, pg_catalog.sum(a) FROM t",
                "SELECT count(*), sum(a) FROM t",
            ),
        ] {
            let got = plan(sql).expect(sql);
            assert_eq!(got.shard_sql, expected_shard, "{sql}");
            assert!(matches!(got.merge, Merge::Final(_)), "{sql}");
            assert!(crate::parses(&got.shard_sql), "{}", got.shard_sql);
        }
    }

    fn final_sql(sql: &str, types: &[u32], rows: &[Vec<Option<&str>>]) -> String {
        let plan = plan(sql).expect(sql);
        let Merge::Final(fin) = plan.merge else {
            panic!("{sql}: not a final plan");
        };
        let rows: Vec<Vec<Option<String>>> = rows
            .iter()
            .map(|r| r.iter().map(|v| v.map(str::to_owned)).collect())
            .collect();
        let out = fin.final_sql(types, &rows).expect(sql);
        assert!(crate::parses(&out), "{out}");
        out
    }

    #[test]
    fn final_sql_computes_from_typed_partials() {
        assert_eq!(
            final_sql(
                "SELECT a, count(*), sum(b) AS total, avg(c) FROM t GROUP BY a ORDER BY total DESC, a LIMIT 5",
                &[23, 20, 20, 20, 20],
                &[
                    vec![Some("1"), Some("2"), Some("10"), Some("7"), Some("2")],
                    vec![None, Some("1"), None, None, Some("0")],
                ],
            ),
            "SELECT __sl_c0__ AS a, (sum(__sl_c1__)::int8) AS count, (sum(__sl_c2__)::int8) AS total, \
             (sum(__sl_c3__)::numeric / NULLIF(sum(__sl_c4__), 0)::numeric) AS avg \
             FROM (VALUES ('1'::int4, '2'::int8, '10'::int8, '7'::int8, '2'::int8), \
             (NULL::int4, '1'::int8, NULL::int8, NULL::int8, '0'::int8)) \
             AS __sl_p(__sl_c0__, __sl_c1__, __sl_c2__, __sl_c3__, __sl_c4__) \
             GROUP BY __sl_c0__ ORDER BY total DESC, a LIMIT 5"
        );
        assert_eq!(
            final_sql(
                "SELECT DISTINCT h FROM t ORDER BY h",
                &[25],
                &[vec![Some("it's")], vec![Some("back\\slash")]],
            ),
            "SELECT DISTINCT __sl_c0__ AS h FROM (VALUES ('it''s'::text), (E'back\\\\slash'::text)) \
             AS __sl_p(__sl_c0__) ORDER BY h"
        );
        assert_eq!(
            final_sql("SELECT max(x)::text, avg(f) FROM t", &[701, 701, 20], &[]),
            "SELECT (max(__sl_c0__)::float8)::text AS max, \
             (sum(__sl_c1__) / NULLIF(sum(__sl_c2__), 0)::float8) AS avg \
             FROM (SELECT NULL::float8, NULL::float8, NULL::int8 WHERE false) \
             AS __sl_p(__sl_c0__, __sl_c1__, __sl_c2__)"
        );
    }

    #[test]
    fn final_output_names_follow_figure_colname() {
        let sql = "SELECT a, t.b, count(*), sum(a)::int4, 1::int8, a + 1, \
                   CASE WHEN a > 0 THEN 1 END, coalesce(a, 0), x AS \"Mixed Case\" \
                   FROM t GROUP BY a, t.b, x";
        let out = final_sql(
            sql,
            &[23, 23, 23, 20, 20],
            &[vec![Some("1"), Some("2"), Some("3"), Some("4"), Some("5")]],
        );
        for name in [
            " AS a,",
            " AS b,",
            " AS count,",
            " AS sum,",
            " AS int8,",
            " AS \"?column?\",",
            " AS \"case\",",
            " AS \"coalesce\",",
            " AS \"Mixed Case\" ",
        ] {
            assert!(out.contains(name), "{name} in {out}");
        }
    }

    #[test]
    fn final_sql_refuses_types_it_cannot_carry() {
        let Merge::Final(fin) = plan("SELECT a, count(*) FROM t GROUP BY a")
            .expect("plan")
            .merge
        else {
            panic!("not final");
        };
        let err = fin.final_sql(&[600, 20], &[]).expect_err("point");
        assert!(err.0.contains("oid 600"), "{}", err.0);
        let err = fin.final_sql(&[20], &[]).expect_err("column count");
        assert!(err.0.contains("columns"), "{}", err.0);
        let Merge::Final(fin) = plan("SELECT avg(r) FROM t").expect("plan").merge else {
            panic!("not final");
        };
        let err = fin.final_sql(&[700, 20], &[]).expect_err("float4 avg");
        assert!(err.0.contains("float4"), "{}", err.0);
    }

    #[test]
    fn refusals_name_the_construct() {
        for (sql, needle) in [
            ("SELECT a, row_number() OVER () FROM t", "window functions"),
            (
                "SELECT a FROM t WINDOW w AS (ORDER BY a)",
                "window functions",
            ),
            ("SELECT * FROM t JOIN u ON t.a = u.a", "joins"),
            ("SELECT * FROM t, u", "more than one FROM item"),
            ("SELECT * FROM (SELECT * FROM t) s", "subqueries in FROM"),
            ("SELECT a FROM t WHERE a IN (SELECT a FROM u)", "subqueries"),
            ("SELECT (SELECT 1) FROM t", "subqueries"),
            ("WITH w AS (SELECT 1) SELECT * FROM t", "WITH"),
            ("SELECT a FROM t UNION SELECT a FROM t", "UNION"),
            ("SELECT a FROM t FOR UPDATE", "FOR UPDATE"),
            ("SELECT a INTO x FROM t", "SELECT INTO"),
            ("SELECT DISTINCT ON (a) a, b FROM t", "DISTINCT ON"),
            ("SELECT a, count(*) FROM t GROUP BY ROLLUP (a)", "ROLLUP"),
            (
                "SELECT a, count(*) FROM t GROUP BY GROUPING SETS ((a), ())",
                "GROUPING SETS",
            ),
            ("SELECT string_agg(b, ',') FROM t", "string_agg"),
            ("SELECT count(DISTINCT a) FROM t", "count(DISTINCT"),
            ("SELECT sum(a) FILTER (WHERE a > 0) FROM t", "FILTER"),
            ("SELECT max(a ORDER BY b) FROM t", "ORDER BY inside max"),
            (
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t",
                "percentile_cont",
            ),
            ("SELECT my_agg(a) FILTER (WHERE true) FROM t", "my_agg"),
            ("SELECT generate_series(1, a) FROM t", "generate_series"),
            ("SELECT a FROM t; SELECT 1", "multiple statements"),
            ("UPDATE t SET a = 1", "only SELECT"),
            ("SELECT a FROM t ORDER BY a USING <", "USING"),
            (
                "SELECT a FROM t LIMIT a",
                "LIMIT must be an integer constant",
            ),
            (
                "SELECT a FROM t OFFSET 1 + 1",
                "OFFSET must be an integer constant",
            ),
            ("SELECT a FROM t FETCH FIRST 3 ROWS WITH TIES", "WITH TIES"),
            (
                "SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > $1",
                "parameters in HAVING",
            ),
            (
                "SELECT a, count(*) FROM t GROUP BY a LIMIT $1",
                "parameters in LIMIT",
            ),
            (
                "SELECT count(*) + $1 FROM t",
                "parameters in the select list",
            ),
            (
                "SELECT a, count(*) FROM t",
                "column a must appear in GROUP BY",
            ),
            (
                "SELECT t.a, count(*) FROM t GROUP BY t.b",
                "column t.a must appear",
            ),
            ("SELECT *, count(*) FROM t GROUP BY a", "SELECT *"),
            ("SELECT sum(count(*)) FROM t", "nested aggregate"),
            ("SELECT a FROM t WHERE sum(a) > 1", "aggregates in WHERE"),
            (
                "SELECT b AS a, count(*) FROM t GROUP BY a",
                "GROUP BY a is ambiguous",
            ),
            ("SELECT count(*) FROM t GROUP BY 3", "GROUP BY position 3"),
            ("SELECT '__sl_c0__' FROM t", "reserved"),
            ("SELECT * FROM ONLY t", "ONLY"),
            ("SELECT * FROM generate_series(1, 3)", "functions in FROM"),
            ("SELECT xmlelement(name a) FROM t", "XmlExpr"),
            (
                "SELECT a, count(*) FROM t GROUP BY a ORDER BY b",
                "column b must appear",
            ),
        ] {
            let err = plan(sql).expect_err(sql);
            assert!(err.0.contains(needle), "{sql}: {}", err.0);
        }
    }

    #[test]
    fn shard_sql_always_parses() {
        for sql in [
            "SELECT a FROM t LIMIT $1",
            "SELECT a FROM t OFFSET $1 LIMIT 7",
            "SELECT a, b FROM t AS x WHERE x.a BETWEEN 1 AND 3 ORDER BY x.b",
            "SELECT lower(b) FROM t ORDER BY lower",
            "SELECT a FROM t WHERE b LIKE 'x%' AND c IS NOT NULL ORDER BY coalesce(c, 0) DESC",
        ] {
            let out = shard_sql(sql);
            assert!(crate::parses(&out), "{sql} -> {out}");
        }
        // An implicit output name is an output name (`ORDER BY lower`).
        let plan = plan("SELECT lower(b) FROM t ORDER BY lower").expect("plan");
        assert_eq!(plan.hidden_columns, 0);
    }
}
