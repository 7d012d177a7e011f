//! The few paths outside the v3 market-data set that ccxt calls to start (COINBASE.md §2.7,
//! §6): `load_markets` reads `/v2/currencies`, `/v2/currencies/crypto` and
//! `/v2/exchange-rates` (through `fetch_currencies`), then `/market/products` and, with keys,
//! `/api/v3/brokerage/transaction_summary`; `fetch_time` reads `/v2/time`. Shapes follow the
//! real samples quoted in ccxt; they are not rate limited (v2's limit is 10,000 per hour) and
//! count as `unknown` paths, so v3 counters stay exact.

use std::collections::BTreeMap;

use hyper::Method;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::{
    jwt,
    routes::{Ctx, Reply},
};

/// The answer to `method path`, or `None` when the path is not one of these.
/// `authorization` is the request's header (for the one private path).
pub(super) fn answer(
    method: &Method,
    path: &str,
    authorization: Option<&[u8]>,
    jwt_key: Option<&crate::coinbase::auth::VerifyingKey>,
    window: jwt::Window,
    ctx: &Ctx<'_>,
) -> Option<Reply> {
    if method != Method::GET {
        return None;
    }
    Some(match path {
        "/v2/time" => {
            Reply::json(200, &json!({"data": {"epoch": ctx.now.unix_timestamp(), "iso": iso(ctx.now)}}))
        }
        "/v2/currencies" => Reply::json(200, &json!({"data": fiat(ctx)})),
        "/v2/currencies/crypto" => Reply::json(200, &json!({"data": crypto(ctx)})),
        "/v2/exchange-rates" => Reply::json(200, &json!({"data": {"currency": "USD", "rates": rates(ctx)}})),
        "/v2/accounts" => {
            if let Err(e) = jwt::check(authorization, jwt_key, "GET", path, window) {
                return Some(Reply::error(401, "UNAUTHENTICATED", e.message()));
            }
            Reply::json(200, &accounts(ctx))
        }
        "/api/v3/brokerage/transaction_summary" => {
            if let Err(e) = jwt::check(authorization, jwt_key, "GET", path, window) {
                return Some(Reply::error(401, "UNAUTHENTICATED", e.message()));
            }
            Reply::json(200, &transaction_summary())
        }
        _ => return None,
    })
}

fn iso(t: time::OffsetDateTime) -> String {
    format!("{}Z", crate::coinbase::wire::format_time(t).split('.').next().unwrap_or_default())
}

/// Quote currencies of the listed products: `{id, name, min_size}` as in ccxt's sample.
fn fiat(ctx: &Ctx<'_>) -> Vec<Value> {
    let mut quotes: Vec<&str> = ctx.market.products().iter().map(|p| p.id.quote()).collect();
    quotes.sort_unstable();
    quotes.dedup();
    quotes
        .into_iter()
        .map(|q| json!({"id": q, "name": format!("{q} (simulated)"), "min_size": "0.01"}))
        .collect()
}

/// Base currencies: `{asset_id, code, name, color, sort_index, exponent, type, address_regex}`.
fn crypto(ctx: &Ctx<'_>) -> Vec<Value> {
    let mut bases: Vec<&str> = ctx.market.products().iter().map(|p| p.id.base()).collect();
    bases.sort_unstable();
    bases.dedup();
    bases
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            json!({
                "asset_id": format!("00000000-0000-4000-8000-{:012x}", i + 1),
                "code": b,
                "name": format!("{b} (simulated)"),
                "color": "#0052FF",
                "sort_index": (i + 1).to_string(),
                "exponent": "8",
                "type": "crypto",
                "address_regex": "^.+$",
            })
        })
        .collect()
}

/// Units of each currency per USD, from the `-USD` products' current prices.
fn rates(ctx: &Ctx<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([("USD".to_string(), "1".to_string())]);
    for p in ctx.market.products() {
        if p.id.quote() != "USD" {
            continue;
        }
        let price = ctx.market.price_at(p, ctx.now);
        if let Some(rate) = Decimal::ONE.checked_div(price) {
            out.insert(p.id.base().to_string(), rate.round_dp(12).normalize().to_string());
        }
    }
    out
}

/// `GET /v2/accounts` in the shape of ccxt's `fetchBalance` fixture: one page, crypto
/// accounts as `wallet`, fiat as `fiat`, `balance.amount` = available + hold.
fn accounts(ctx: &Ctx<'_>) -> Value {
    let data: Vec<Value> = ctx
        .accounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let w = super::routes::wire_account(i, a, ctx.seed);
            let dec = |s: &str| s.parse::<Decimal>().unwrap_or_default();
            let total = dec(&w.available_balance.value) + w.hold.as_ref().map_or(Decimal::ZERO, |h| dec(&h.value));
            let fiat = w.account_type.contains("FIAT");
            json!({
                "id": w.uuid,
                "name": w.name,
                "primary": w.default,
                "type": if fiat { "fiat" } else { "wallet" },
                "currency": {"code": w.currency, "name": w.currency, "type": if fiat { "fiat" } else { "crypto" }},
                "balance": {"amount": total.to_string(), "currency": w.currency},
                "created_at": w.created_at,
                "updated_at": w.updated_at,
                "resource": "account",
                "resource_path": format!("/v2/accounts/{}", w.uuid),
            })
        })
        .collect();
    json!({
        "pagination": {
            "ending_before": null, "starting_after": null, "previous_ending_before": null,
            "next_starting_after": null, "limit": 250, "order": "desc",
            "previous_uri": null, "next_uri": null
        },
        "data": data
    })
}

/// ccxt's sample body (`fetch_markets_v3`), fees of the lowest tier.
fn transaction_summary() -> Value {
    json!({
        "total_volume": 0,
        "total_fees": 0,
        "fee_tier": {
            "pricing_tier": "Advanced 1",
            "usd_from": "0",
            "usd_to": "1000",
            "taker_fee_rate": super::orders::TAKER_FEE_RATE.to_string(),
            "maker_fee_rate": super::orders::MAKER_FEE_RATE.to_string(),
            "aop_from": "",
            "aop_to": ""
        },
        "margin_rate": null,
        "goods_and_services_tax": null,
        "advanced_trade_only_volume": 0,
        "advanced_trade_only_fees": 0,
        "coinbase_pro_volume": 0,
        "coinbase_pro_fees": 0
    })
}
