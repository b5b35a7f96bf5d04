//! Micro-benchmarks (criterion, in `benches/`) and the load harness (`pgbench-compare.sh`).
