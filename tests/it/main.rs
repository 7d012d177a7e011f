//! The integration tests: one binary, over real HTTP against the simulated exchange.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client;
mod clock;
mod coordinated;
mod evaluator;
mod faults;
mod freshness;
mod fuzz;
mod hostile;
mod jwt;
mod load;
mod orders;
mod outage;
mod props;
mod proxy;
mod redis;
mod secrets;
mod sim;
mod stream;
mod stream_scale;
mod support;
mod wire;
