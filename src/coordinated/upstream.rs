//! The way out to the upstream: one call with the breaker, the gate, retries and accounting,
//! the batched ticker flush, and the ticker and accounts fetches behind the single-flights.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    Inner,
    batch::{Items, Next},
    cache::Entry,
    stats::Op,
};
use crate::{
    error::{Error, Result},
    limiter::EndpointClass,
    model::{Account, Granularity, ProductId, Ticker},
    util::{add, inc, lock},
};

impl Inner {
    /// One upstream call under the source's [`RetryPolicy`](crate::RetryPolicy), each attempt
    /// through [`attempt`](Inner::attempt).
    pub(super) async fn call<T, F, Fut>(&self, op: Op, class: EndpointClass, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let on_retry = |retry: u32, e: &Error, wait: Duration| {
            inc(&self.counters.retries);
            tracing::debug!(op = op.as_str(), attempt = retry, error = %e, wait_ms = wait.as_millis() as u64, "retrying upstream call");
        };
        self.retry.run(|_| self.attempt(op, class, &f), on_retry).await
    }

    /// One attempt: the breaker admits it, the gate (if this source limits) lets it out, and
    /// its outcome is recorded once, into the breaker, the gate and the counters.
    async fn attempt<T, F, Fut>(&self, op: Op, class: EndpointClass, f: &F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let r = async {
            let permit = self.breaker.admit_waiting(class).await?;
            if let Some(gate) = self.limiting.gate() {
                gate.acquire_with(class, op.priority()).await?;
            }
            let t0 = Instant::now();
            let r = f().await;
            permit.record(&r);
            if let Some(gate) = self.limiting.gate() {
                gate.record(class, &r);
            }
            if r.as_ref().err().is_none_or(Error::reached_exchange) {
                self.counters.upstream_call(op, t0.elapsed());
            }
            r
        }
        .await;
        if let Err(e) = &r {
            self.counters.error(e);
        }
        r
    }

    /// Remember `product` as unknown for `negative_ttl`, and drop its cached data: reads serve
    /// a cache hit without consulting the negative cache, so no hit may outlive this.
    pub(super) async fn remember_unknown(&self, product: &ProductId) {
        self.negative.insert(product.clone(), Instant::now() + self.cfg.negative_ttl).await;
        self.tickers.invalidate(product);
        for g in Granularity::ALL {
            self.series.invalidate(&(product.clone(), g)).await;
        }
    }

    pub(super) fn ticker_entry(&self, t: Ticker, now: Instant) -> Entry<Ticker> {
        Entry::new(t, now, now + self.cfg.ticker_ttl)
    }

    pub(super) async fn fetch_ticker(
        this: Arc<Inner>,
        product: ProductId,
        missed_at: Instant,
        max_age: Option<Duration>,
    ) -> Result<Entry<Ticker>> {
        // Another fetch may have filled the cache after our miss (its flight ended between our
        // cache read and this flight): that value is as fresh as a new fetch would be. Its
        // `fetched_at` is taken just before its insert, which may land after our read began,
        // so a value that is simply fresh for this read (the policy and `max_age`) counts too;
        // without that, 1,000 concurrent cold reads on a running clock made two upstream calls.
        if let Some(e) = this.tickers.get(&product)
            && (e.fetched_at >= missed_at || e.is_fresh(Instant::now(), max_age))
        {
            return Ok(e);
        }
        if !this.cfg.batch_tickers {
            let class = this.cfg.market_data_class;
            let r = this.call(Op::Ticker, class, || this.upstream.ticker(&product)).await;
            return match r {
                Ok(t) => {
                    let e = this.ticker_entry(t, Instant::now());
                    this.tickers.insert(product, e.clone());
                    this.patch_live(&e.value).await;
                    Ok(e)
                }
                Err(err) => {
                    if matches!(err, Error::NotFound(_)) {
                        this.remember_unknown(&product).await;
                    }
                    Err(err)
                }
            };
        }
        let (rx, next) = this.batcher.submit(product);
        match next {
            Next::Wait => {}
            Next::Flush(items) => {
                tokio::spawn(Inner::flush(Arc::clone(&this), items));
            }
            Next::StartTimer(id) => {
                let window = this.cfg.batch_window;
                let inner = Arc::clone(&this);
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if let Some(items) = inner.batcher.take(id) {
                        Inner::flush(inner, items).await;
                    }
                });
            }
        }
        rx.await.unwrap_or_else(|_| Err(Error::Closed("the batch task stopped before answering".into())))
    }

    /// The ticker of a product a batch answer left out, from a call of its own: cached if
    /// it comes, remembered as unknown only if the exchange says so for this product alone.
    async fn confirm_ticker(this: &Arc<Inner>, product: &ProductId, now: Instant) -> Result<Entry<Ticker>> {
        let class = this.cfg.market_data_class;
        match this.call(Op::Ticker, class, || this.upstream.ticker(product)).await {
            Ok(t) if &t.product == product => {
                let e = this.ticker_entry(t, now);
                this.tickers.insert(product.clone(), e.clone());
                Ok(e)
            }
            Ok(t) => Err(Error::decode(format!("asked for {product}, the upstream answered {}", t.product))),
            Err(Error::NotFound(m)) => {
                this.remember_unknown(product).await;
                Err(Error::NotFound(m))
            }
            Err(e) => Err(e),
        }
    }

    /// Send one batched call and answer every request in it.
    pub(super) async fn flush(this: Arc<Inner>, items: Items) {
        let products: Vec<ProductId> = items.iter().map(|(p, _)| p.clone()).collect();
        inc(&this.counters.batch_calls);
        add(&this.counters.batched_products, products.len() as u64);
        let r = this.call(Op::Tickers, this.cfg.batch_class, || this.upstream.tickers(&products)).await;
        let r = match r {
            // One bad id may fail a whole batch on some servers: ask for each product alone so
            // only the bad one is remembered as unknown.
            Err(Error::NotFound(_) | Error::Upstream { status: 400, .. }) if products.len() > 1 => {
                let class = this.cfg.market_data_class;
                let mut found = Vec::new();
                for p in &products {
                    if let Ok(t) = this.call(Op::Ticker, class, || this.upstream.ticker(p)).await {
                        found.push(t);
                    }
                }
                Ok(found)
            }
            r => r,
        };
        let now = Instant::now();
        match r {
            Ok(tickers) => {
                let mut by: HashMap<ProductId, Ticker> =
                    tickers.into_iter().map(|t| (t.product.clone(), t)).collect();
                for (p, tx) in items {
                    let reply = match by.remove(&p) {
                        Some(t) => {
                            let e = this.ticker_entry(t, now);
                            this.tickers.insert(p, e.clone());
                            this.patch_live(&e.value).await;
                            Ok(e)
                        }
                        // Left out of the batch answer: unknown, or dropped by a server that
                        // answered only part of the question. One bad answer must not blind a
                        // product for `negative_ttl`, so it is asked for alone before it is
                        // remembered as unknown.
                        None => Inner::confirm_ticker(&this, &p, now).await,
                    };
                    let _ = tx.send(reply);
                }
            }
            Err(e) => {
                for (_, tx) in items {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }

    pub(super) async fn fetch_accounts(
        this: Arc<Inner>,
        read_at: Instant,
        epoch: u64,
    ) -> Result<Entry<Arc<Vec<Account>>>> {
        // As for tickers: a flight that ended after the caller's cache read (between that read
        // and this flight) fetched a value as recent as a new call would.
        if let Some(e) = lock(&this.accounts).clone()
            && e.fetched_at >= read_at
        {
            return Ok(e);
        }
        let r = this.call(Op::Accounts, EndpointClass::Private, || this.upstream.accounts()).await?;
        let now = Instant::now();
        let e = Entry::new(Arc::new(r), now, now + this.cfg.accounts_ttl);
        let mut slot = lock(&this.accounts);
        // Invalidated while in flight (an order was placed): the answer may predate the order.
        if this.accounts_epoch.load(std::sync::atomic::Ordering::SeqCst) == epoch {
            *slot = Some(e.clone());
        }
        Ok(e)
    }
}
