//! An HTTP host serving market data from the coordinated source: the seed's FastAPI
//! endpoints, in Rust with axum.
//!
//! ```text
//! cargo run --example http_service -- --port 8080
//! curl localhost:8080/ticker/BTC-USD       # 200 {"product":"BTC-USD","price":"...",...}
//! curl localhost:8080/ticker/NOPE-USD      # 404 {"detail":"Ticker unavailable"}
//! curl localhost:8080/accounts
//! curl localhost:8080/migration/stats
//! curl localhost:8080/metrics              # Prometheus text (tickshare::metrics)
//! ```
//!
//! It runs its own simulated exchange; `--serve-secs N` stops after N seconds (for scripted
//! runs), otherwise it serves until Ctrl-C.

use std::{error::Error, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;
use tickshare::{
    CoordinatedSource, DirectSource, MarketDataSource, MigrationFlags, ProductId, SourceSelector,
    sim::SimExchange,
};

#[derive(Clone)]
struct AppState {
    coordinated: CoordinatedSource,
    selector: SourceSelector,
    bot_ids: Arc<Vec<String>>,
}

async fn ticker(State(s): State<AppState>, Path(product): Path<String>) -> Response {
    let Ok(product) = product.parse::<ProductId>() else {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Ticker unavailable"}))).into_response();
    };
    match s.coordinated.ticker(&product).await {
        Ok(t) => Json(t).into_response(),
        Err(tickshare::Error::NotFound(_)) => {
            (StatusCode::NOT_FOUND, Json(json!({"detail": "Ticker unavailable"}))).into_response()
        }
        Err(e) if e.is_retryable() => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"detail": e.to_string()}))).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, Json(json!({"detail": e.to_string()}))).into_response(),
    }
}

async fn accounts(State(s): State<AppState>) -> Response {
    match s.coordinated.accounts().await {
        Ok(a) => Json(a).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, Json(json!({"detail": e.to_string()}))).into_response(),
    }
}

async fn migration_stats(State(s): State<AppState>) -> Response {
    Json(json!({
        "coordinated": s.coordinated.stats(),
        "migration_progress": s.selector.migration_progress(s.bot_ids.iter()),
        "selector": s.selector.stats(),
        "migration_report": s.selector.shadow().report(),
    }))
    .into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let text = tickshare::metrics::prometheus_text(&s.coordinated.stats(), s.coordinated.config());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut port: u16 = 8080;
    let mut serve_secs: Option<u64> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => port = it.next().ok_or("--port needs a value")?.parse()?,
            "--serve-secs" => serve_secs = Some(it.next().ok_or("--serve-secs needs a value")?.parse()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }

    let sim = SimExchange::builder().latency(Duration::from_millis(30)).start().await?;
    let coordinated = CoordinatedSource::coinbase(sim.client()?).build()?;
    let legacy = DirectSource::new(sim.client_builder().unlimited().build()?);
    let flags = MigrationFlags::from_env()?;
    let selector = SourceSelector::new(
        Arc::new(legacy) as Arc<dyn MarketDataSource>,
        Arc::new(coordinated.clone()) as Arc<dyn MarketDataSource>,
        flags,
    );
    let bot_ids = Arc::new((0..25).map(|i| format!("bot-{i:03}")).collect::<Vec<_>>());
    let app = Router::new()
        .route("/ticker/{product_id}", get(ticker))
        .route("/accounts", get(accounts))
        .route("/migration/stats", get(migration_stats))
        .route("/metrics", get(metrics))
        .with_state(AppState { coordinated, selector, bot_ids });

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let stop = async move {
        match serve_secs {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    sim.shutdown().await;
    Ok(())
}
