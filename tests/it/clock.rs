//! The exchange's clock and the client's: JWTs minted from an offset kept against `GET /time`,
//! and a 401 retried once with a fresh token (issue #15).

use std::time::Duration;

use tickshare::{
    Credentials, Error, MarketDataSource,
    sim::{Endpoint, Fault, SimExchange},
};

/// A simulated exchange that pins `creds` and judges tokens by a clock `skew` ahead of ours
/// with no leeway at all.
async fn strict_sim(creds: &Credentials, skew: time::Duration) -> SimExchange {
    SimExchange::builder()
        .jwt_public_key_pem(&creds.public_key_pem())
        .clock_skew(skew)
        .jwt_leeway(Duration::ZERO)
        .start()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_clock_is_3_s_fast_gets_data_with_zero_leeway() {
    let creds = Credentials::generate_ed25519("d2efa49a-0000-4000-8000-000000000001");
    let sim = strict_sim(&creds, time::Duration::seconds(-3)).await;
    let client = sim.client_builder().credentials(creds).build().unwrap();
    // The first token is minted 3 s ahead of the exchange: 401, then /time, then a retry.
    let accounts = client.accounts().await.unwrap();
    assert!(!accounts.is_empty());
    let offset = client.clock_offset();
    assert!(offset <= time::Duration::seconds(-3) && offset > time::Duration::seconds(-4), "{offset}");
    let st = sim.stats();
    assert_eq!((st.auth_failures, st.calls(Endpoint::Time)), (1, 1));
    // From then on every token is minted from the exchange's clock: no more 401s.
    for _ in 0..5 {
        client.accounts().await.unwrap();
    }
    assert_eq!(sim.stats().auth_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn sync_clock_at_start_avoids_the_first_401() {
    let creds = Credentials::generate("organizations/o/apiKeys/k");
    let sim = strict_sim(&creds, time::Duration::seconds(-3)).await;
    let client = sim.client_builder().credentials(creds).build().unwrap();
    client.sync_clock().await.unwrap();
    client.accounts().await.unwrap();
    assert_eq!(sim.stats().auth_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn without_the_offset_a_fast_clock_is_refused() {
    let creds = Credentials::generate("organizations/o/apiKeys/k");
    let sim = strict_sim(&creds, time::Duration::seconds(-3)).await;
    let client = sim.client_builder().credentials(creds).unauthorized_retry(None).build().unwrap();
    assert!(matches!(client.accounts().await, Err(Error::Unauthorized(_))));
}

#[tokio::test(start_paused = true)]
async fn a_401_on_a_key_that_worked_is_retried_once() {
    let sim = SimExchange::builder().start().await.unwrap();
    let client = sim.client().unwrap();
    client.accounts().await.unwrap();
    // Throttling answered as 401 (coinbase-advanced-py #60): one 401, then data.
    sim.add_fault(Fault::status(401).on(Endpoint::Accounts).times(1));
    let t0 = tokio::time::Instant::now();
    assert!(!client.accounts().await.unwrap().is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(500), "after a backoff");
    // Two 401s in a row: the second surfaces as Unauthorized.
    sim.add_fault(Fault::status(401).on(Endpoint::Accounts).times(2));
    assert!(matches!(client.accounts().await, Err(Error::Unauthorized(_))));
}
