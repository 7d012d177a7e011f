//! The integration tests: one binary, over real HTTP against the simulated exchange.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod coordinated;
mod evaluator;
mod faults;
mod freshness;
mod fuzz;
mod hostile;
mod load;
mod props;
mod redis;
mod secrets;
mod sim;
mod stream;
mod support;
mod wire;
