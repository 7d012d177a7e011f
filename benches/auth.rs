//! Minting the JWT that every private request carries (Coinbase wants a fresh token per
//! request): nonce, header and claims JSON, base64url and the signature, for an EC P-256 key
//! (ES256) and an Ed25519 key (EdDSA, the CDP default since 2025). Callgrind put ES256 signing
//! at 40–60 % of all CPU in the scale runs, so this is the per-request floor of the client.
//! `jwt_verify` is the proxy's cost of checking a key-mode client's token, once per request.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use tickshare::{Credentials, coinbase::auth::verify_jwt};

const HOST: &str = "api.coinbase.com";
const PATH: &str = "/api/v3/brokerage/accounts";

pub(crate) fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("jwt_sign");
    g.throughput(Throughput::Elements(1));
    for (name, creds) in keys() {
        // The claim: what is timed is a token the exchange would accept.
        let key = creds.verifying_key();
        let token = creds.rest_jwt("GET", HOST, PATH);
        let now = token_nbf(&token);
        verify_jwt(&token, &key, "GET", PATH, now, 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        g.bench_with_input(BenchmarkId::from_parameter(name), &creds, |b, creds| {
            b.iter(|| creds.rest_jwt(black_box("GET"), black_box(HOST), black_box(PATH)))
        });
    }
    g.finish();

    // The proxy's side (#17): a client in key mode sends a fresh token per request, and the
    // proxy verifies each one before it answers, even from its cache.
    let mut g = c.benchmark_group("jwt_verify");
    g.throughput(Throughput::Elements(1));
    for (name, creds) in keys() {
        let key = creds.verifying_key();
        let token = creds.rest_jwt("GET", HOST, PATH);
        let now = token_nbf(&token);
        g.bench_with_input(BenchmarkId::from_parameter(name), &token, |b, token| {
            b.iter(|| {
                verify_jwt(black_box(token), &key, "GET", PATH, now, 0)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
            })
        });
    }
    g.finish();
}

/// One key of each type Coinbase issues.
fn keys() -> [(&'static str, Credentials); 2] {
    [
        ("es256", Credentials::generate("organizations/o/apiKeys/k")),
        ("eddsa", Credentials::generate_ed25519("organizations/o/apiKeys/k")),
    ]
}

/// The token's own `nbf`, so the check above does not depend on the clock ticking over.
fn token_nbf(token: &str) -> u64 {
    let (_, claims) =
        tickshare::coinbase::auth::decode_unverified(token).unwrap_or_else(|e| panic!("decode: {e}"));
    claims["nbf"].as_u64().unwrap_or_default()
}
