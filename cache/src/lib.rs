//! In-memory result cache (moka) for hot point reads and its invalidation
//! index (`store`), and the decoding of the WAL change stream that
//! invalidates it for writes made elsewhere (`pgoutput`).

pub mod pgoutput;
pub mod store;
