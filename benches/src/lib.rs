//! Micro-benchmarks (criterion) and the load harness.
