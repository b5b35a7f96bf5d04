//! Shard map replicated with Raft (openraft): state machine, storage, client, watch and leases. Filled in by the metadata issue.
