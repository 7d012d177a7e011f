//! The integration tests: one binary, over real HTTP against the simulated exchange.

mod sim;
mod support;
