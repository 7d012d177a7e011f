//! The integration tests: one binary, over real HTTP against the simulated exchange.

mod client;
mod coordinated;
mod evaluator;
mod sim;
mod support;
