//! Orders on the simulated exchange: create (market and limit), get, list, cancel and fills,
//! with balances that move (module docs of [`crate::sim`], "Orders").
//!
//! Shapes follow the samples in ccxt's `coinbase.py` and the official SDK's `orders_types.py`.
//! What neither shows (failure reasons beyond those quoted, list limits) is marked unverified
//! where it is defined. The book is bounded ([`MAX_ORDERS`]); every amount is a decimal and
//! every operation on one is checked, so no request can panic the simulator.

use std::collections::HashMap;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    Endpoint, SimAccount,
    market::{Market, ProductSpec, mix, unix_ms},
    routes::{Query, Reply, shown, uuid},
};
use crate::coinbase::wire::format_time;

/// The taker fee rate of every simulated fill that takes liquidity (ccxt's sample
/// `transaction_summary`, the lowest tier; served by `/transaction_summary` too).
pub const TAKER_FEE_RATE: Decimal = Decimal::from_parts(8, 0, 0, false, 3);
/// The maker fee rate of a resting limit order when it fills.
pub const MAKER_FEE_RATE: Decimal = Decimal::from_parts(6, 0, 0, false, 3);
/// The most orders the simulator keeps; a create beyond it fails (`ORDER_ENTRY_DISABLED`).
pub const MAX_ORDERS: usize = 100_000;
/// The page size of list orders and list fills without `limit` (unverified: Coinbase
/// documents none; ccxt pages by 100).
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// The largest page of list orders and list fills; larger `limit`s are clamped (unverified).
pub const MAX_LIST_LIMIT: usize = 1_000;
/// The most ids one `batch_cancel` may name (unverified; larger requests are a 400).
pub const MAX_CANCEL_IDS: usize = 100;
/// The largest request body the simulator reads; a larger one is a 400.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// Base sizes are on `base_increment` = 0.00000001.
const BASE_SCALE: u32 = 8;
/// A resting order is checked against the price once per simulated second, at most this many
/// times per settlement (a longer gap is sampled more coarsely).
const MAX_SETTLE_STEPS: i64 = 86_400;
const ORDER_NOT_FOUND: &str = "order with this orderID was not found";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Buy,
    Sell,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Buy => "BUY",
            Side::Sell => "SELL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    Filled,
    Cancelled,
    Expired,
}

impl Status {
    const ALL: [Status; 4] = [Status::Open, Status::Filled, Status::Cancelled, Status::Expired];

    fn name(self) -> &'static str {
        match self {
            Status::Open => "OPEN",
            Status::Filled => "FILLED",
            Status::Cancelled => "CANCELLED",
            Status::Expired => "EXPIRED",
        }
    }
}

/// How long a limit order lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tif {
    Gtc,
    /// Good until this UNIX millisecond.
    Gtd(i64),
    Ioc,
    Fok,
}

impl Tif {
    fn name(self) -> &'static str {
        match self {
            Tif::Gtc => "GOOD_UNTIL_CANCELLED",
            Tif::Gtd(_) => "GOOD_UNTIL_DATE_TIME",
            Tif::Ioc => "IMMEDIATE_OR_CANCEL",
            Tif::Fok => "FILL_OR_KILL",
        }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    /// `market_market_ioc`: exactly one of the sizes.
    Market {
        quote_size: Option<Decimal>,
        base_size: Option<Decimal>,
    },
    Limit {
        base_size: Decimal,
        limit_price: Decimal,
        post_only: bool,
        tif: Tif,
    },
}

#[derive(Debug, Clone)]
struct SimOrder {
    id: String,
    client_order_id: String,
    product: String,
    base: String,
    quote: String,
    side: Side,
    kind: Kind,
    /// The `order_configuration` as the simulator understood it (one key, the known fields
    /// only: a client's extra fields are neither echoed nor kept), echoed back.
    config: Map<String, Value>,
    status: Status,
    created_ms: i64,
    /// The last millisecond a resting order was checked against the price.
    checked_ms: i64,
    filled_size: Decimal,
    filled_value: Decimal,
    fees: Decimal,
    fills: u32,
    last_fill_ms: Option<i64>,
    /// Funds on hold for a resting order: quote currency for a buy, base for a sell.
    hold: Decimal,
    cancel_message: &'static str,
    /// `(price, size, accepted at ms)` of every accepted edit, oldest first.
    edits: Vec<(Decimal, Decimal, i64)>,
}

#[derive(Debug, Clone)]
struct SimFill {
    n: usize,
    order: usize,
    ms: i64,
    price: Decimal,
    size: Decimal,
    commission: Decimal,
    maker: bool,
}

/// The simulated user's orders and fills.
#[derive(Debug, Default)]
pub(crate) struct OrderBook {
    orders: Vec<SimOrder>,
    by_id: HashMap<String, usize>,
    by_client: HashMap<String, usize>,
    fills: Vec<SimFill>,
    open: usize,
    /// Previews answered so far (their ids).
    previews: usize,
}

/// A failed create: 200 with `success: false` and this reason, as Coinbase answers.
struct Failure {
    reason: &'static str,
    message: String,
}

fn fail(reason: &'static str, message: impl Into<String>) -> Failure {
    Failure { reason, message: message.into() }
}

/// What an order request needs besides the book.
pub(crate) struct OrderCtx<'a> {
    pub(crate) market: &'a Market,
    pub(crate) accounts: &'a mut Vec<SimAccount>,
    pub(crate) seed: u64,
    pub(crate) now: OffsetDateTime,
}

impl OrderCtx<'_> {
    fn account(&mut self, currency: &str) -> &mut SimAccount {
        let i = match self.accounts.iter().position(|a| a.currency == currency) {
            Some(i) => i,
            None => {
                self.accounts.push(SimAccount::new(currency, Decimal::ZERO));
                self.accounts.len() - 1
            }
        };
        &mut self.accounts[i]
    }

    fn available(&self, currency: &str) -> Decimal {
        self.accounts.iter().find(|a| a.currency == currency).map_or(Decimal::ZERO, |a| a.available)
    }

    /// Add `delta` (may be negative) to a balance; `false` (and no change) on overflow.
    fn credit(&mut self, currency: &str, available: Decimal, hold: Decimal) -> bool {
        let a = self.account(currency);
        match (a.available.checked_add(available), a.hold.checked_add(hold)) {
            (Some(av), Some(h)) => {
                a.available = av;
                a.hold = h;
                true
            }
            _ => false,
        }
    }
}

impl OrderBook {
    /// Whether any order rests on the book (settling has work to do).
    pub(crate) fn has_open(&self) -> bool {
        self.open > 0
    }

    /// Answer one order request.
    pub(crate) fn answer(
        &mut self,
        endpoint: Endpoint,
        id: Option<&str>,
        query: &Query,
        body: &[u8],
        ctx: &mut OrderCtx<'_>,
    ) -> Reply {
        self.settle(ctx);
        let result = match endpoint {
            Endpoint::CreateOrder => Ok(self.create(body, ctx)),
            Endpoint::CancelOrders => self.cancel(body, ctx),
            Endpoint::EditOrder => self.edit(body, ctx),
            Endpoint::PreviewOrder => {
                self.previews += 1;
                preview(body, self.previews, ctx)
            }
            Endpoint::GetOrder => match id.and_then(|id| self.by_id.get(id)) {
                Some(&i) => Ok(Reply::json(200, &json!({"order": self.order_json(i, ctx.seed)}))),
                None => Err(Reply::error(404, "NOT_FOUND", ORDER_NOT_FOUND)),
            },
            Endpoint::ListOrders => self.list(query, ctx.seed),
            Endpoint::ListFills => self.list_fills(query, ctx.seed),
            _ => Err(Reply::not_found("Not Found")),
        };
        result.unwrap_or_else(|e| e)
    }

    /// Fill or expire resting orders against the price path up to now.
    pub(crate) fn settle(&mut self, ctx: &mut OrderCtx<'_>) {
        if self.open == 0 {
            return;
        }
        let now_ms = unix_ms(ctx.now);
        for i in 0..self.orders.len() {
            if self.orders[i].status != Status::Open {
                continue;
            }
            let o = &self.orders[i];
            let Kind::Limit { limit_price, tif, .. } = o.kind else { continue };
            let Some(spec) = ctx.market.get(&o.product) else { continue };
            let from = o.checked_ms;
            if now_ms <= from {
                continue;
            }
            let step = ((now_ms - from) / MAX_SETTLE_STEPS).max(1_000);
            let mut t = from;
            let mut outcome = None;
            while t < now_ms {
                t = t.saturating_add(step).min(now_ms);
                if let Tif::Gtd(end) = tif
                    && t >= end
                {
                    outcome = Some((end, None));
                    break;
                }
                let (bid, ask) = ctx.market.bid_ask(spec, t);
                let crossed = match o.side {
                    Side::Buy => ask <= limit_price,
                    Side::Sell => bid >= limit_price,
                };
                if crossed {
                    outcome = Some((t, Some(limit_price)));
                    break;
                }
            }
            self.orders[i].checked_ms = t;
            match outcome {
                Some((at, Some(price))) => self.fill_resting(i, price, at, ctx),
                Some((_, None)) => self.close(i, Status::Expired, "order expired", ctx),
                None => {}
            }
        }
    }

    fn create(&mut self, body: &[u8], ctx: &mut OrderCtx<'_>) -> Reply {
        #[derive(Deserialize)]
        struct Request {
            client_order_id: Option<String>,
            product_id: Option<String>,
            side: Option<String>,
            order_configuration: Option<Map<String, Value>>,
        }
        let req: Request = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(_) => return Reply::bad_request("request body is not a valid create order request"),
        };
        let client_order_id = req.client_order_id.unwrap_or_default();
        if client_order_id.is_empty() || client_order_id.len() > 128 {
            return Reply::bad_request("client_order_id is required (at most 128 characters)");
        }
        let config = req.order_configuration.unwrap_or_default();
        // A client_order_id seen before returns the order it made: retries are safe.
        if let Some(&i) = self.by_client.get(&client_order_id) {
            return self.created(i);
        }
        let product = req.product_id.unwrap_or_default();
        let outcome = match ctx.market.get(&product) {
            None => Err(fail("INVALID_PRODUCT_ID", "ProductID is invalid")),
            Some(spec) => self.place(spec, req.side.as_deref(), &config, client_order_id, ctx),
        };
        match outcome {
            Ok(i) => self.created(i),
            Err(f) => Reply::json(
                200,
                &json!({
                    "success": false,
                    "failure_reason": "UNKNOWN_FAILURE_REASON",
                    "order_id": "",
                    "error_response": {
                        "error": f.reason,
                        "message": f.message,
                        "error_details": "",
                        "new_order_failure_reason": f.reason,
                    },
                    "order_configuration": config,
                }),
            ),
        }
    }

    fn created(&self, i: usize) -> Reply {
        let o = &self.orders[i];
        Reply::json(
            200,
            &json!({
                "success": true,
                "failure_reason": "UNKNOWN_FAILURE_REASON",
                "order_id": o.id,
                "success_response": {
                    "order_id": o.id,
                    "product_id": o.product,
                    "side": o.side.name(),
                    "client_order_id": o.client_order_id,
                },
                "order_configuration": o.config,
            }),
        )
    }

    /// Validate, check funds, then fill at once, rest or cancel; the new order's index.
    fn place(
        &mut self,
        spec: &ProductSpec,
        side: Option<&str>,
        config: &Map<String, Value>,
        client_order_id: String,
        ctx: &mut OrderCtx<'_>,
    ) -> Result<usize, Failure> {
        if self.orders.len() >= MAX_ORDERS {
            return Err(fail(
                "ORDER_ENTRY_DISABLED",
                format!("the simulator keeps at most {MAX_ORDERS} orders"),
            ));
        }
        let Terms { side, kind, fill, hold, base, quote } = terms(spec, side, config, ctx)?;
        let now_ms = unix_ms(ctx.now);
        let n = self.orders.len();
        let order = SimOrder {
            id: uuid(ctx.seed, "order", n),
            client_order_id,
            product: spec.id.as_str().to_string(),
            base,
            quote,
            side,
            config: config_of(&kind),
            kind,
            status: Status::Open,
            created_ms: now_ms,
            checked_ms: now_ms,
            filled_size: Decimal::ZERO,
            filled_value: Decimal::ZERO,
            fees: Decimal::ZERO,
            fills: 0,
            last_fill_ms: None,
            hold: Decimal::ZERO,
            cancel_message: "",
            edits: Vec::new(),
        };
        self.by_id.insert(order.id.clone(), n);
        self.by_client.insert(order.client_order_id.clone(), n);
        self.orders.push(order);
        self.open += 1;
        match fill {
            Some((size, price)) => {
                if !self.fill(n, size, price, now_ms, false, ctx) {
                    self.close(n, Status::Cancelled, "order size out of range", ctx);
                }
            }
            None if hold.is_zero() => self.close(n, Status::Cancelled, "not filled immediately", ctx),
            None => {
                let o = &mut self.orders[n];
                o.hold = hold;
                let currency = if side == Side::Buy { o.quote.clone() } else { o.base.clone() };
                ctx.credit(&currency, -hold, hold);
            }
        }
        Ok(n)
    }

    /// Fill order `i` completely: `size` at `price`, taking or making liquidity. Balances move
    /// (a resting order's hold is released first). `false` when an amount overflows.
    fn fill(
        &mut self,
        i: usize,
        size: Decimal,
        price: Decimal,
        ms: i64,
        maker: bool,
        ctx: &mut OrderCtx<'_>,
    ) -> bool {
        let rate = if maker { MAKER_FEE_RATE } else { TAKER_FEE_RATE };
        let Some(value) = size.checked_mul(price) else { return false };
        let Some(fee) = value.checked_mul(rate) else { return false };
        let o = &self.orders[i];
        let (side, base, quote, held) = (o.side, o.base.clone(), o.quote.clone(), o.hold);
        let ok = match side {
            Side::Buy => {
                let Some(cost) = value.checked_add(fee) else { return false };
                ctx.credit(&quote, held - cost, -held) && ctx.credit(&base, size, Decimal::ZERO)
            }
            Side::Sell => {
                let proceeds = (value - fee).max(Decimal::ZERO);
                ctx.credit(&base, held - size, -held) && ctx.credit(&quote, proceeds, Decimal::ZERO)
            }
        };
        if !ok {
            return false;
        }
        let o = &mut self.orders[i];
        o.hold = Decimal::ZERO;
        o.filled_size = size;
        o.filled_value = value;
        o.fees = fee;
        o.fills = 1;
        o.last_fill_ms = Some(ms);
        o.status = Status::Filled;
        self.open -= 1;
        let n = self.fills.len();
        self.fills.push(SimFill { n, order: i, ms, price, size, commission: fee, maker });
        true
    }

    fn fill_resting(&mut self, i: usize, price: Decimal, ms: i64, ctx: &mut OrderCtx<'_>) {
        let Kind::Limit { base_size, .. } = self.orders[i].kind else { return };
        if !self.fill(i, base_size, price, ms, true, ctx) {
            self.close(i, Status::Cancelled, "order size out of range", ctx);
        }
    }

    /// End an open order without a fill, releasing its hold.
    fn close(&mut self, i: usize, status: Status, message: &'static str, ctx: &mut OrderCtx<'_>) {
        let o = &mut self.orders[i];
        if o.status != Status::Open {
            return;
        }
        let held = std::mem::take(&mut o.hold);
        o.status = status;
        o.cancel_message = message;
        let currency = if o.side == Side::Buy { o.quote.clone() } else { o.base.clone() };
        self.open -= 1;
        if !held.is_zero() {
            ctx.credit(&currency, held, -held);
        }
    }

    /// `POST /orders/edit`: a new price and/or size for an open GTC limit order. Its hold is
    /// released and taken again at the new terms; an edit that makes it marketable fills it
    /// at once, taking liquidity, as a new order would.
    fn edit(&mut self, body: &[u8], ctx: &mut OrderCtx<'_>) -> Result<Reply, Reply> {
        #[derive(Deserialize)]
        struct Request {
            order_id: Option<String>,
            price: Option<String>,
            size: Option<String>,
        }
        let req: Request = serde_json::from_slice(body)
            .map_err(|_| Reply::bad_request("request body is not an edit order request"))?;
        let id = req
            .order_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Reply::bad_request("order_id is required"))?;
        let failed = |reason: &str| {
            Ok(Reply::json(
                200,
                &json!({"success": false, "errors": [{
                    "edit_failure_reason": reason,
                    "preview_failure_reason": "UNKNOWN_PREVIEW_FAILURE_REASON",
                }]}),
            ))
        };
        let Some(&i) = self.by_id.get(&id) else { return failed("ORDER_NOT_FOUND") };
        let o = &self.orders[i];
        let Kind::Limit { base_size, limit_price, post_only, tif: Tif::Gtc } = o.kind else {
            return failed("ONLY_LIMIT_ORDER_EDITS_SUPPORTED");
        };
        if o.status != Status::Open {
            return failed("ONLY_OPEN_ORDERS_CAN_BE_EDITED");
        }
        let Some(spec) = ctx.market.get(&o.product) else { return failed("ORDER_NOT_FOUND") };
        let parse = |v: Option<&str>, old: Decimal, scale: u32| -> Option<Decimal> {
            match v.filter(|s| !s.is_empty()) {
                None => Some(old),
                Some(s) => {
                    s.parse::<Decimal>().ok().filter(|d| *d > Decimal::ZERO && d.normalize().scale() <= scale)
                }
            }
        };
        let Some(price) = parse(req.price.as_deref(), limit_price, spec.scale) else {
            return failed("INVALID_EDITED_PRICE");
        };
        let Some(size) = parse(req.size.as_deref(), base_size, BASE_SCALE) else {
            return failed("INVALID_EDITED_SIZE");
        };
        if (price, size) == (limit_price, base_size) {
            return failed("EDIT_REQUEST_EQUAL_TO_ORIGINAL_REQUEST");
        }
        let now_ms = unix_ms(ctx.now);
        let (bid, ask) = ctx.market.bid_ask(spec, now_ms);
        let side = o.side;
        let marketable = match side {
            Side::Buy => ask <= price,
            Side::Sell => bid >= price,
        };
        if marketable && post_only {
            return failed("INVALID_EDITED_PRICE");
        }
        // What the edited order needs: the fill's cost now, or its new hold.
        let (fill_price, hold) = match side {
            Side::Buy => {
                (ask, size.checked_mul(price).and_then(|v| v.checked_mul(Decimal::ONE + TAKER_FEE_RATE)))
            }
            Side::Sell => (bid, Some(size)),
        };
        let need = if marketable && side == Side::Buy {
            size.checked_mul(fill_price).and_then(|v| v.checked_mul(Decimal::ONE + TAKER_FEE_RATE))
        } else {
            hold
        };
        let currency = if side == Side::Buy { o.quote.clone() } else { o.base.clone() };
        let old_hold = o.hold;
        match need.and_then(|n| ctx.available(&currency).checked_add(old_hold).map(|have| n <= have)) {
            Some(true) => {}
            _ => return failed("COMMANDER_REJECTED_EDIT_ORDER"),
        }
        // Release the old hold, take the new terms.
        ctx.credit(&currency, old_hold, -old_hold);
        let o = &mut self.orders[i];
        o.hold = Decimal::ZERO;
        o.kind = Kind::Limit { base_size: size, limit_price: price, post_only, tif: Tif::Gtc };
        if let Some(Value::Object(f)) = o.config.get_mut("limit_limit_gtc") {
            f.insert("base_size".into(), Value::from(size.to_string()));
            f.insert("limit_price".into(), Value::from(price.to_string()));
        }
        o.edits.push((price, size, now_ms));
        o.checked_ms = now_ms;
        if marketable {
            if !self.fill(i, size, fill_price, now_ms, false, ctx) {
                self.close(i, Status::Cancelled, "order size out of range", ctx);
            }
        } else if let Some(hold) = hold {
            self.orders[i].hold = hold;
            ctx.credit(&currency, -hold, hold);
        }
        Ok(Reply::json(200, &json!({"success": true, "errors": []})))
    }

    fn cancel(&mut self, body: &[u8], ctx: &mut OrderCtx<'_>) -> Result<Reply, Reply> {
        #[derive(Deserialize)]
        struct Request {
            order_ids: Option<Vec<String>>,
        }
        let ids = serde_json::from_slice::<Request>(body)
            .ok()
            .and_then(|r| r.order_ids)
            .filter(|ids| !ids.is_empty())
            .ok_or_else(|| Reply::bad_request("order_ids is required"))?;
        if ids.len() > MAX_CANCEL_IDS {
            return Err(Reply::bad_request(&format!("at most {MAX_CANCEL_IDS} order_ids per request")));
        }
        let results: Vec<Value> = ids
            .iter()
            .map(|id| {
                let open = self.by_id.get(id).copied().filter(|&i| self.orders[i].status == Status::Open);
                match open {
                    Some(i) => {
                        self.close(i, Status::Cancelled, "User requested cancel", ctx);
                        json!({"success": true, "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON", "order_id": id})
                    }
                    None => json!({"success": false, "failure_reason": "UNKNOWN_CANCEL_ORDER", "order_id": id}),
                }
            })
            .collect();
        Ok(Reply::json(200, &json!({"results": results})))
    }

    fn list(&self, q: &Query, seed: u64) -> Result<Reply, Reply> {
        let ids: Vec<&str> = q.all("order_ids").collect();
        let products = product_filter(q);
        let mut statuses = Vec::new();
        for s in q.all("order_status") {
            let status = Status::ALL
                .into_iter()
                .find(|st| st.name() == s)
                .ok_or_else(|| Reply::bad_request(&format!("order_status is invalid: {}", shown(s))))?;
            statuses.push(status);
        }
        let side = q.get("order_side").filter(|s| !s.is_empty());
        let start = time_param(q, "start_date")?;
        let end = time_param(q, "end_date")?;
        let matching = self.orders.iter().enumerate().rev().filter(|(_, o)| {
            (ids.is_empty() || ids.contains(&o.id.as_str()))
                && (products.is_empty() || products.contains(&o.product.as_str()))
                && (statuses.is_empty() || statuses.contains(&o.status))
                && side.is_none_or(|s| s == o.side.name())
                && start.is_none_or(|t| o.created_ms >= t)
                && end.is_none_or(|t| o.created_ms <= t)
        });
        let (page, has_next, cursor) = paged(q, matching)?;
        let orders: Vec<Value> = page.into_iter().map(|(i, _)| self.order_json(i, seed)).collect();
        Ok(Reply::json(
            200,
            &json!({"orders": orders, "sequence": "0", "has_next": has_next, "cursor": cursor}),
        ))
    }

    fn list_fills(&self, q: &Query, seed: u64) -> Result<Reply, Reply> {
        let mut order_ids: Vec<&str> = q.all("order_ids").collect();
        order_ids.extend(q.all("order_id"));
        let trade_ids: Vec<&str> = q.all("trade_ids").collect();
        let products = product_filter(q);
        let start = time_param(q, "start_sequence_timestamp")?;
        let end = time_param(q, "end_sequence_timestamp")?;
        let matching = self.fills.iter().rev().filter(|f| {
            let o = &self.orders[f.order];
            (order_ids.is_empty() || order_ids.contains(&o.id.as_str()))
                && (trade_ids.is_empty() || trade_ids.contains(&trade_id(seed, f.n).as_str()))
                && (products.is_empty() || products.contains(&o.product.as_str()))
                && start.is_none_or(|t| f.ms >= t)
                && end.is_none_or(|t| f.ms <= t)
        });
        let (page, _, cursor) = paged(q, matching)?;
        let fills: Vec<Value> = page.into_iter().map(|f| self.fill_json(f, seed)).collect();
        Ok(Reply::json(200, &json!({"fills": fills, "cursor": cursor})))
    }

    fn order_json(&self, i: usize, seed: u64) -> Value {
        let o = &self.orders[i];
        let (order_type, tif) = match o.kind {
            Kind::Market { .. } => ("MARKET", Tif::Ioc),
            Kind::Limit { tif, .. } => ("LIMIT", tif),
        };
        let size_in_quote = matches!(o.kind, Kind::Market { quote_size: Some(_), .. });
        let average = o.filled_value.checked_div(o.filled_size).unwrap_or_default();
        let after_fees = match o.side {
            Side::Buy => o.filled_value.checked_add(o.fees),
            Side::Sell => o.filled_value.checked_sub(o.fees),
        }
        .unwrap_or_default();
        let done = if o.status == Status::Filled { "100" } else { "0" };
        json!({
            "order_id": o.id,
            "product_id": o.product,
            "user_id": uuid(seed, "user", 0),
            "order_configuration": o.config,
            "side": o.side.name(),
            "client_order_id": o.client_order_id,
            "status": o.status.name(),
            "time_in_force": tif.name(),
            "created_time": time_of(o.created_ms),
            "completion_percentage": done,
            "filled_size": amount(o.filled_size),
            "average_filled_price": amount(average),
            "fee": "",
            "number_of_fills": o.fills.to_string(),
            "filled_value": amount(o.filled_value),
            "pending_cancel": false,
            "size_in_quote": size_in_quote,
            "total_fees": amount(o.fees),
            "size_inclusive_of_fees": size_in_quote,
            "total_value_after_fees": amount(after_fees),
            "trigger_status": "INVALID_ORDER_TYPE",
            "order_type": order_type,
            "reject_reason": "REJECT_REASON_UNSPECIFIED",
            "settled": o.status != Status::Open,
            "product_type": "SPOT",
            "reject_message": "",
            "cancel_message": o.cancel_message,
            "order_placement_source": "RETAIL_ADVANCED",
            "outstanding_hold_amount": amount(o.hold),
            "is_liquidation": false,
            "last_fill_time": o.last_fill_ms.map(time_of),
            "edit_history": o.edits.iter().map(|(price, size, ms)| json!({
                "price": amount(*price), "size": amount(*size), "replace_accept_timestamp": time_of(*ms),
            })).collect::<Vec<_>>(),
            "leverage": "",
            "margin_type": "UNKNOWN_MARGIN_TYPE",
            "retail_portfolio_id": uuid(seed, "portfolio", 0),
            "originating_order_id": "",
            "attached_order_id": "",
        })
    }

    fn fill_json(&self, f: &SimFill, seed: u64) -> Value {
        let o = &self.orders[f.order];
        let a = mix(seed, f.n as u64 ^ 0xF111);
        let (b, c, d) = (mix(a, 1), mix(a, 2), mix(a, 3));
        let size_in_quote = matches!(o.kind, Kind::Market { quote_size: Some(_), .. });
        json!({
            "entry_id": format!("{a:016x}{b:016x}{c:016x}{d:016x}"),
            "trade_id": trade_id(seed, f.n),
            "order_id": o.id,
            "trade_time": time_of(f.ms),
            "trade_type": "FILL",
            "price": amount(f.price),
            // With `size_in_quote`, Coinbase's fill `size` is in the quote currency (ccxt divides
            // it by the price); the base size is then `size / price`.
            "size": amount(if size_in_quote { f.size.checked_mul(f.price).unwrap_or_default() } else { f.size }),
            "commission": amount(f.commission),
            "product_id": o.product,
            "sequence_timestamp": time_of(f.ms),
            "liquidity_indicator": if f.maker { "MAKER" } else { "TAKER" },
            "size_in_quote": size_in_quote,
            "user_id": uuid(seed, "user", 0),
            "side": o.side.name(),
            "retail_portfolio_id": uuid(seed, "portfolio", 0),
        })
    }
}

/// The one supported `order_configuration` (market or limit), checked against the product.
/// `POST /orders/preview`: what a create would do now, without doing it (no order, no
/// balance change); `n` numbers the preview, for its id. Failures are listed in `errs` as `PREVIEW_` + the create's reason
/// (unverified: Coinbase documents the preview reasons as a separate enum).
fn preview(body: &[u8], n: usize, ctx: &OrderCtx<'_>) -> Result<Reply, Reply> {
    #[derive(Deserialize)]
    struct Request {
        product_id: Option<String>,
        side: Option<String>,
        order_configuration: Option<Map<String, Value>>,
    }
    let req: Request = serde_json::from_slice(body)
        .map_err(|_| Reply::bad_request("request body is not a preview order request"))?;
    let config = req.order_configuration.unwrap_or_default();
    let spec = ctx.market.get(req.product_id.as_deref().unwrap_or_default());
    let (bid, ask) = spec.map_or((Decimal::ZERO, Decimal::ZERO), |p| ctx.market.bid_ask(p, unix_ms(ctx.now)));
    let outcome = match spec {
        None => Err(fail("INVALID_PRODUCT_ID", "ProductID is invalid")),
        Some(spec) => terms(spec, req.side.as_deref(), &config, ctx),
    };
    let zero = Value::from("0");
    let mut out = json!({
        "order_total": zero, "commission_total": zero, "errs": [], "warning": [],
        "quote_size": zero, "base_size": zero,
        "best_bid": amount(bid), "best_ask": amount(ask), "is_max": false, "slippage": "0",
        "preview_id": "",
    });
    match outcome {
        Err(f) => out["errs"] = json!([format!("PREVIEW_{}", f.reason)]),
        Ok(t) => {
            // What fills now, or what a resting limit order would fill at (as a maker).
            let (size, price, rate) = match (t.fill, &t.kind) {
                (Some((size, price)), _) => (size, price, TAKER_FEE_RATE),
                (None, Kind::Limit { base_size, limit_price, .. }) => {
                    (*base_size, *limit_price, MAKER_FEE_RATE)
                }
                (None, Kind::Market { .. }) => (Decimal::ZERO, Decimal::ZERO, TAKER_FEE_RATE),
            };
            let value = size.checked_mul(price).unwrap_or_default();
            let commission = value.checked_mul(rate).unwrap_or_default();
            let total = match t.side {
                Side::Buy => value.checked_add(commission),
                Side::Sell => value.checked_sub(commission),
            }
            .unwrap_or_default();
            out["order_total"] = Value::from(amount(total));
            out["commission_total"] = Value::from(amount(commission));
            out["quote_size"] = Value::from(amount(value));
            out["base_size"] = Value::from(amount(size));
            out["preview_id"] = Value::from(uuid(ctx.seed, "preview", n));
        }
    }
    Ok(Reply::json(200, &out))
}

/// What an order would do now: its side and kind, what fills at once (size, price) or what a
/// resting order holds, checked against the product and the funds.
struct Terms {
    side: Side,
    kind: Kind,
    fill: Option<(Decimal, Decimal)>,
    hold: Decimal,
    base: String,
    quote: String,
}

fn terms(
    spec: &ProductSpec,
    side: Option<&str>,
    config: &Map<String, Value>,
    ctx: &OrderCtx<'_>,
) -> Result<Terms, Failure> {
    let side = match side {
        Some("BUY") => Side::Buy,
        Some("SELL") => Side::Sell,
        _ => return Err(fail("INVALID_SIDE", "side must be BUY or SELL")),
    };
    let kind = parse_config(config, spec, ctx.now)?;
    let (bid, ask) = ctx.market.bid_ask(spec, unix_ms(ctx.now));
    let (base, quote) = (spec.id.base().to_string(), spec.id.quote().to_string());
    let too_large = || fail("INVALID_REQUEST", "order size out of range");
    // What fills now (size, price), or None to rest (limit) / cancel (IOC, FOK).
    let (fill, hold) = match &kind {
        Kind::Market { quote_size, base_size } => {
            let price = if side == Side::Buy { ask } else { bid };
            let size = match (quote_size, base_size) {
                (Some(q), _) => {
                    let per_unit = match side {
                        Side::Buy => price.checked_mul(Decimal::ONE + TAKER_FEE_RATE),
                        Side::Sell => Some(price),
                    };
                    per_unit
                        .and_then(|u| q.checked_div(u))
                        .map(|s| s.round_dp_with_strategy(BASE_SCALE, RoundingStrategy::ToZero))
                        .ok_or_else(too_large)?
                }
                (None, Some(b)) => *b,
                (None, None) => {
                    return Err(fail("UNSUPPORTED_ORDER_CONFIGURATION", "a size is required"));
                }
            };
            if size.is_zero() {
                return Err(fail("INVALID_SIZE_PRECISION", "the order is smaller than base_increment"));
            }
            (Some((size, price)), Decimal::ZERO)
        }
        Kind::Limit { base_size, limit_price, post_only, tif } => {
            let marketable = match side {
                Side::Buy => ask <= *limit_price,
                Side::Sell => bid >= *limit_price,
            };
            if marketable && *post_only {
                return Err(fail("INVALID_LIMIT_PRICE_POST_ONLY", "a post-only order would take liquidity"));
            }
            // Funds are held at the limit price with the taker fee, as on Coinbase.
            let hold = match side {
                Side::Buy => base_size
                    .checked_mul(*limit_price)
                    .and_then(|v| v.checked_mul(Decimal::ONE + TAKER_FEE_RATE))
                    .ok_or_else(too_large)?,
                Side::Sell => *base_size,
            };
            let at = if side == Side::Buy { ask } else { bid };
            match (marketable, tif) {
                (true, _) => (Some((*base_size, at)), Decimal::ZERO),
                (false, Tif::Ioc | Tif::Fok) => (None, Decimal::ZERO),
                (false, _) => (None, hold),
            }
        }
    };
    // Funds: what the fill costs, or what the resting order holds.
    let (need_currency, need) = match (side, fill) {
        (Side::Buy, Some((size, price))) => {
            let value = size.checked_mul(price).ok_or_else(too_large)?;
            (&quote, value.checked_mul(Decimal::ONE + TAKER_FEE_RATE).ok_or_else(too_large)?)
        }
        (Side::Sell, Some((size, _))) => (&base, size),
        (Side::Buy, None) => (&quote, hold),
        (Side::Sell, None) => (&base, hold),
    };
    if need > ctx.available(need_currency) {
        return Err(fail("INSUFFICIENT_FUND", "Insufficient balance in source account"));
    }
    Ok(Terms { side, kind, fill, hold, base, quote })
}

/// The `order_configuration` of `kind`, as Coinbase shows it back.
fn config_of(kind: &Kind) -> Map<String, Value> {
    let s = |d: &Decimal| Value::from(d.to_string());
    let (key, fields) = match kind {
        Kind::Market { quote_size: Some(q), .. } => ("market_market_ioc", json!({"quote_size": s(q)})),
        Kind::Market { base_size, .. } => {
            ("market_market_ioc", json!({"base_size": s(&base_size.unwrap_or_default())}))
        }
        Kind::Limit { base_size, limit_price, post_only, tif } => match tif {
            Tif::Gtc => (
                "limit_limit_gtc",
                json!({"base_size": s(base_size), "limit_price": s(limit_price), "post_only": post_only}),
            ),
            Tif::Gtd(end) => (
                "limit_limit_gtd",
                json!({"base_size": s(base_size), "limit_price": s(limit_price),
                       "end_time": time_of(*end), "post_only": post_only}),
            ),
            Tif::Fok => {
                ("limit_limit_fok", json!({"base_size": s(base_size), "limit_price": s(limit_price)}))
            }
            Tif::Ioc => ("sor_limit_ioc", json!({"base_size": s(base_size), "limit_price": s(limit_price)})),
        },
    };
    let mut m = Map::new();
    m.insert(key.to_string(), fields);
    m
}

fn parse_config(
    config: &Map<String, Value>,
    spec: &ProductSpec,
    now: OffsetDateTime,
) -> Result<Kind, Failure> {
    let unsupported = |m: &str| fail("UNSUPPORTED_ORDER_CONFIGURATION", m.to_string());
    let (key, fields) = match config.iter().next() {
        Some((k, Value::Object(f))) if config.len() == 1 => (k.as_str(), f),
        _ => return Err(unsupported("order_configuration must hold exactly one configuration")),
    };
    let field = |name: &str| fields.get(name).and_then(Value::as_str).filter(|s| !s.is_empty());
    let decimal = |name: &str, scale: u32, reason: &'static str| -> Result<Option<Decimal>, Failure> {
        let Some(s) = field(name) else { return Ok(None) };
        let d: Decimal = s.parse().map_err(|_| fail("INVALID_REQUEST", format!("{name} is not a number")))?;
        if d <= Decimal::ZERO {
            return Err(fail("INVALID_REQUEST", format!("{name} must be positive")));
        }
        if d.normalize().scale() > scale {
            return Err(fail(reason, format!("{name} has too many decimal places")));
        }
        Ok(Some(d))
    };
    let base = |name| decimal(name, BASE_SCALE, "INVALID_SIZE_PRECISION");
    let price = |name| decimal(name, spec.scale, "INVALID_PRICE_PRECISION");
    let post_only = fields.get("post_only").and_then(Value::as_bool).unwrap_or(false);
    let limit = |tif: Tif, post_only: bool| -> Result<Kind, Failure> {
        match (base("base_size")?, price("limit_price")?) {
            (Some(base_size), Some(limit_price)) => {
                Ok(Kind::Limit { base_size, limit_price, post_only, tif })
            }
            _ => Err(unsupported("base_size and limit_price are required")),
        }
    };
    match key {
        "market_market_ioc" => {
            let quote_size = decimal("quote_size", spec.scale, "INVALID_SIZE_PRECISION")?;
            let base_size = base("base_size")?;
            if quote_size.is_some() == base_size.is_some() {
                return Err(unsupported("exactly one of quote_size and base_size is required"));
            }
            Ok(Kind::Market { quote_size, base_size })
        }
        "limit_limit_gtc" => limit(Tif::Gtc, post_only),
        "limit_limit_gtd" => {
            let end = field("end_time")
                .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                .ok_or_else(|| unsupported("end_time is required (RFC 3339)"))?;
            if end <= now {
                return Err(fail("INVALID_REQUEST", "end_time is in the past"));
            }
            limit(Tif::Gtd(unix_ms(end)), post_only)
        }
        "limit_limit_fok" => limit(Tif::Fok, false),
        "sor_limit_ioc" => limit(Tif::Ioc, false),
        _ => {
            Err(unsupported("the simulator supports market_market_ioc and limit orders (GTC, GTD, FOK, IOC)"))
        }
    }
}

fn product_filter(q: &Query) -> Vec<&str> {
    q.all("product_ids").chain(q.all("product_id")).filter(|p| !p.is_empty()).collect()
}

/// An RFC 3339 query parameter as UNIX milliseconds.
fn time_param(q: &Query, key: &str) -> Result<Option<i64>, Reply> {
    match q.get(key).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => OffsetDateTime::parse(s, &Rfc3339)
            .map(|t| Some(unix_ms(t)))
            .map_err(|_| Reply::bad_request(&format!("{key} is invalid: {}", shown(s)))),
    }
}

/// One page of `items` by `limit` and the offset `cursor`: (page, has_next, next cursor).
fn paged<T>(q: &Query, items: impl Iterator<Item = T>) -> Result<(Vec<T>, bool, String), Reply> {
    let limit = match q.get("limit").filter(|s| !s.is_empty()) {
        None => DEFAULT_LIST_LIMIT,
        Some(s) => match s.parse::<u64>() {
            Ok(0) => DEFAULT_LIST_LIMIT,
            Ok(l) => usize::try_from(l).unwrap_or(MAX_LIST_LIMIT).min(MAX_LIST_LIMIT),
            Err(_) => return Err(Reply::bad_request(&format!("limit is invalid: {}", shown(s)))),
        },
    };
    let from = match q.get("cursor").filter(|s| !s.is_empty()) {
        None => 0,
        Some(c) => {
            c.parse::<usize>().map_err(|_| Reply::bad_request(&format!("cursor is invalid: {}", shown(c))))?
        }
    };
    let mut rest = items.skip(from);
    let page: Vec<T> = rest.by_ref().take(limit).collect();
    let has_next = rest.next().is_some();
    let cursor = if has_next { from.saturating_add(page.len()).to_string() } else { String::new() };
    Ok((page, has_next, cursor))
}

fn trade_id(seed: u64, n: usize) -> String {
    uuid(seed, "fill", n)
}

fn time_of(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format_time(t)
}

fn amount(d: Decimal) -> String {
    d.normalize().to_string()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::macros::datetime;

    use super::*;
    use crate::model::ProductId;

    #[derive(Debug, Clone)]
    enum Op {
        Market { buy: bool, in_quote: bool, amount: u32 },
        Limit { buy: bool, size_milli: u32, offset_pct: i32, tif: u8, post_only: bool },
        Cancel(usize),
        Edit { i: usize, size_milli: u32, offset_pct: i32 },
        Advance(u32),
        Garbage(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<bool>(), any::<bool>(), 1u32..20_000).prop_map(|(buy, in_quote, amount)| Op::Market {
                buy,
                in_quote,
                amount
            }),
            (any::<bool>(), 1u32..3_000, -3i32..=3, 0u8..4, any::<bool>()).prop_map(
                |(buy, size_milli, offset_pct, tif, post_only)| Op::Limit {
                    buy,
                    size_milli,
                    offset_pct,
                    tif,
                    post_only
                }
            ),
            (0usize..40).prop_map(Op::Cancel),
            (0usize..40, 1u32..3_000, -3i32..=3).prop_map(|(i, size_milli, offset_pct)| Op::Edit {
                i,
                size_milli,
                offset_pct
            }),
            (1u32..7_200).prop_map(Op::Advance),
            prop::collection::vec(any::<u8>(), 0..80).prop_map(Op::Garbage),
        ]
    }

    fn body(op: &Op, n: usize, mid: Decimal, now: OffsetDateTime) -> Value {
        let (side, config) = match op {
            Op::Market { buy, in_quote, amount } => {
                let key = if *in_quote { "quote_size" } else { "base_size" };
                let size =
                    if *in_quote { Decimal::from(*amount) } else { Decimal::new(i64::from(*amount), 4) };
                (*buy, json!({"market_market_ioc": {key: size.to_string()}}))
            }
            Op::Limit { buy, size_milli, offset_pct, tif, post_only } => {
                let price = (mid * Decimal::from(100 + offset_pct) / Decimal::from(100)).round_dp(2);
                let mut f = json!({"base_size": Decimal::new(i64::from(*size_milli), 3).to_string(),
                                   "limit_price": price.to_string(), "post_only": post_only});
                let key = match tif {
                    0 => "limit_limit_gtc",
                    1 => {
                        let end = now + time::Duration::minutes(20);
                        f["end_time"] = Value::from(end.format(&Rfc3339).unwrap_or_default());
                        "limit_limit_gtd"
                    }
                    2 => "limit_limit_fok",
                    _ => "sor_limit_ioc",
                };
                (*buy, json!({ key: f }))
            }
            _ => (true, json!({})),
        };
        json!({"client_order_id": format!("c{n}"), "product_id": "BTC-USD",
               "side": if side { "BUY" } else { "SELL" }, "order_configuration": config})
    }

    fn balance(accounts: &[SimAccount], c: &str) -> (Decimal, Decimal) {
        accounts
            .iter()
            .find(|a| a.currency == c)
            .map_or((Decimal::ZERO, Decimal::ZERO), |a| (a.available, a.hold))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Whatever is asked, nothing panics, no balance goes negative, holds are exactly what
        /// open orders hold, and every unit of USD and BTC is accounted for by the fills.
        #[test]
        fn the_books_always_balance(ops in prop::collection::vec(op(), 1..40)) {
            let btc: ProductId = "BTC-USD".parse().unwrap();
            let market = Market::new(7, std::slice::from_ref(&btc));
            let spec = market.get("BTC-USD").unwrap().clone();
            let mut accounts = SimAccount::defaults();
            let start = accounts.clone();
            let mut book = OrderBook::default();
            let mut now = datetime!(2024-04-24 09:56:38 UTC);
            for (n, op) in ops.iter().enumerate() {
                let mut ctx = OrderCtx { market: &market, accounts: &mut accounts, seed: 7, now };
                let (bid, ask) = market.bid_ask(&spec, unix_ms(now));
                let mid = (bid + ask) / Decimal::TWO;
                match op {
                    Op::Advance(secs) => {
                        now += time::Duration::seconds(i64::from(*secs));
                        let mut ctx = OrderCtx { market: &market, accounts: &mut accounts, seed: 7, now };
                        book.settle(&mut ctx);
                    }
                    Op::Cancel(i) => {
                        let id = book.orders.get(*i).map(|o| o.id.clone()).unwrap_or_else(|| "x".into());
                        let b = serde_json::to_vec(&json!({"order_ids": [id]})).unwrap();
                        let r = book.answer(Endpoint::CancelOrders, None, &Query::default(), &b, &mut ctx);
                        prop_assert_eq!(r.status, 200);
                    }
                    Op::Edit { i, size_milli, offset_pct } => {
                        let id = book.orders.get(*i).map(|o| o.id.clone()).unwrap_or_else(|| "x".into());
                        let price = (mid * Decimal::from(100 + offset_pct) / Decimal::from(100)).round_dp(2);
                        let size = Decimal::new(i64::from(*size_milli), 3);
                        let b = serde_json::to_vec(&json!({"order_id": id, "price": price.to_string(), "size": size.to_string()})).unwrap();
                        let r = book.answer(Endpoint::EditOrder, None, &Query::default(), &b, &mut ctx);
                        prop_assert_eq!(r.status, 200);
                    }
                    Op::Garbage(bytes) => {
                        for e in [Endpoint::CreateOrder, Endpoint::CancelOrders, Endpoint::EditOrder] {
                            let r = book.answer(e, None, &Query::default(), bytes, &mut ctx);
                            prop_assert!(r.status == 200 || r.status == 400);
                        }
                    }
                    _ => {
                        let b = serde_json::to_vec(&body(op, n, mid, now)).unwrap();
                        let r = book.answer(Endpoint::CreateOrder, None, &Query::default(), &b, &mut ctx);
                        prop_assert_eq!(r.status, 200);
                    }
                }
                // Invariants after every step.
                for a in &accounts {
                    prop_assert!(a.available >= Decimal::ZERO && a.hold >= Decimal::ZERO, "{a:?}");
                }
                let open = book.orders.iter().filter(|o| o.status == Status::Open).count();
                prop_assert_eq!(open, book.open);
                for c in ["USD", "BTC"] {
                    let held: Decimal = book
                        .orders
                        .iter()
                        .filter(|o| o.status == Status::Open && (if o.side == Side::Buy { &o.quote } else { &o.base }) == c)
                        .map(|o| o.hold)
                        .sum();
                    prop_assert_eq!(balance(&accounts, c).1, held, "{}", c);
                }
                // Conservation: each currency moved exactly by the fills.
                let (mut usd, mut coin) = (Decimal::ZERO, Decimal::ZERO);
                for o in book.orders.iter().filter(|o| o.status == Status::Filled) {
                    prop_assert!(o.filled_size > Decimal::ZERO && o.fees >= Decimal::ZERO);
                    match o.side {
                        Side::Buy => {
                            usd -= o.filled_value + o.fees;
                            coin += o.filled_size;
                        }
                        Side::Sell => {
                            usd += (o.filled_value - o.fees).max(Decimal::ZERO);
                            coin -= o.filled_size;
                        }
                    }
                }
                let total = |a: &[SimAccount], c| {
                    let (av, h) = balance(a, c);
                    av + h
                };
                prop_assert_eq!(total(&accounts, "USD"), total(&start, "USD") + usd);
                prop_assert_eq!(total(&accounts, "BTC"), total(&start, "BTC") + coin);
            }
        }
    }
}
