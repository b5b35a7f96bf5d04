//! In-memory result cache (moka) for hot point reads and its invalidation index. Filled in by the cache issue.
