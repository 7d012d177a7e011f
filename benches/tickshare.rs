//! Criterion benchmarks of tickshare (see README, "Performance").
#![allow(missing_docs)]

fn main() {}
