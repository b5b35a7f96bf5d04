//! Statement parsing with PostgreSQL's own grammar (pg_query) and the decisions made from it.

pub mod analysis;
pub mod copy_split;
pub mod ddl;
mod effects_cache;
mod error;
pub mod hash;
pub mod hint;
pub mod insert_split;
pub mod key_param;
pub mod merge;
pub mod placement;
mod replica;
pub mod route;
pub mod scatter;
mod session_effect;
mod shard_map;
mod tree_scan;

pub use analysis::{analyse, Analysis, AnalysisCache, KeySource, StatementKind, TableTarget};
pub use effects_cache::EffectsCache;
pub use error::{Error, Result};
pub use replica::{begin_read_only, ReplicaSafety};
pub use route::{route, Params, Route};
pub use scatter::{
    plan as plan_scatter, Bound, FinalPlan, Merge, Refusal, ScatterPlan, SortColumn, SortKey,
};
pub use session_effect::{
    may_have_session_effects, session_effects, statement_may_have_session_effects,
    try_session_effects, SessionEffect,
};
pub use shard_map::{
    Epoch, Group, KeyType, MovePhase, Partition, PartitionIdx, PartitionState, Shard, ShardId,
    ShardMap, Table,
};

/// The relations `sql` names (as written, possibly schema-qualified); `None`
/// if it does not parse (PostgreSQL will then report the error itself).
pub fn referenced_tables(sql: &str) -> Option<Vec<String>> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).ok()?;
    Some(parsed.tables())
}

/// Whether `sql` is valid syntax for PostgreSQL's grammar. Used to answer a
/// Parse without a server when the statement is known to parse, so that a
/// syntax error is still reported at Parse time by the server itself.
pub fn parses(sql: &str) -> bool {
    pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).is_ok()
}
