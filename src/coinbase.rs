//! The Coinbase Advanced Trade v3 REST client.

pub mod wire;
