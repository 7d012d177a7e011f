//! The coordinated source's counters for an operator: Prometheus text rendered from
//! [`CoordinatedStats`], and (feature `metrics`) the same numbers through the
//! [`metrics`](https://docs.rs/metrics) facade.
//!
//! Every number comes from one [`CoordinatedStats`] snapshot, so the text and the facade can
//! never disagree, and the hot paths of the source keep their plain atomics: publishing costs
//! one snapshot per scrape, not one facade call per read.
//!
//! Why hand-rendered text and not `metrics-exporter-prometheus`: the stats already hold every
//! counter, exactly and monotonically; the exporter would add a global recorder, its own HTTP
//! listener or a render handle, and a dozen transitive crates (hyper client side, quanta,
//! sketches, indexmap, ...) to render about forty lines of text. A host that already runs a
//! `metrics` recorder gets the same names through [`publish`] (feature `metrics`).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `tickshare_upstream_calls_total` | counter | `endpoint` (`ticker`, `best_bid_ask`, `candles`, `accounts`), `class` (`public`, `private`) |
//! | `tickshare_cache_hits_total`, `tickshare_cache_misses_total` | counter | |
//! | `tickshare_coalesced_waiters_total` | counter | |
//! | `tickshare_batch_calls_total`, `tickshare_batched_products_total` | counter | |
//! | `tickshare_negative_cache_hits_total`, `tickshare_stale_serves_total`, `tickshare_revalidations_total`, `tickshare_retries_total` | counter | |
//! | `tickshare_rate_limited_total` | counter | (429s from the exchange) |
//! | `tickshare_candles_fetched_total` | counter | |
//! | `tickshare_upstream_errors_total` | counter | `kind` |
//! | `tickshare_upstream_latency_ms` | gauge | `quantile` (`0.5`, `0.9`, `0.99`, `1`) |
//! | `tickshare_cache_entries` | gauge | |
//! | `tickshare_limiter_acquired_total`, `_waits_total`, `_rejected_local_total`, `_shed_total`, `_rate_limit_pauses_total` | counter | `class` |
//! | `tickshare_limiter_waiting`, `tickshare_limiter_paused_ms` | gauge | `class` |
//! | `tickshare_breaker_state` | gauge (1 for the current state) | `class`, `state` |
//! | `tickshare_breaker_opened_total`, `tickshare_breaker_rejected_total`, `tickshare_breaker_probes_total` | counter | `class` |

use std::fmt::Write as _;

use crate::{
    coordinated::{BreakerState, CoordinatedConfig, CoordinatedStats},
    limiter::EndpointClass,
};

/// One sample: name, labels, value, whether it is a counter.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `tickshare_cache_hits_total`.
    pub name: &'static str,
    /// Label pairs.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
    /// `true` for a monotonic counter, `false` for a gauge.
    pub counter: bool,
    /// One line of help text.
    pub help: &'static str,
}

fn counter(name: &'static str, help: &'static str, labels: Vec<(&'static str, String)>, v: u64) -> Sample {
    Sample { name, labels, value: v as f64, counter: true, help }
}

fn gauge(name: &'static str, help: &'static str, labels: Vec<(&'static str, String)>, v: f64) -> Sample {
    Sample { name, labels, value: v, counter: false, help }
}

/// The class each of the source's upstream operations is sent on.
fn class_of(endpoint: &str, cfg: &CoordinatedConfig) -> EndpointClass {
    match endpoint {
        "best_bid_ask" => cfg.batch_class,
        "accounts" => EndpointClass::Private,
        _ => cfg.market_data_class,
    }
}

/// Every number of `stats` as a sample (see the [module table](self)). `cfg` gives each
/// endpoint its class label.
pub fn samples(stats: &CoordinatedStats, cfg: &CoordinatedConfig) -> Vec<Sample> {
    let mut out = Vec::with_capacity(64);
    for (endpoint, n) in &stats.upstream_calls_by_endpoint {
        let class = class_of(endpoint, cfg).as_str().to_string();
        out.push(counter(
            "tickshare_upstream_calls_total",
            "Upstream calls to the exchange, by endpoint and class.",
            vec![("endpoint", endpoint.clone()), ("class", class)],
            *n,
        ));
    }
    let plain: [(&'static str, &'static str, u64); 12] = [
        ("tickshare_cache_hits_total", "Reads answered from the cache.", stats.cache_hits),
        ("tickshare_cache_misses_total", "Reads that needed the upstream.", stats.cache_misses),
        (
            "tickshare_coalesced_waiters_total",
            "Reads that joined a fetch already in flight.",
            stats.coalesced_waiters,
        ),
        ("tickshare_batch_calls_total", "Batched best_bid_ask calls.", stats.batch_calls),
        (
            "tickshare_batched_products_total",
            "Products requested through batched calls (batch size = this / batch calls).",
            stats.batched_products,
        ),
        (
            "tickshare_negative_cache_hits_total",
            "Reads refused from the unknown-product cache.",
            stats.negative_cache_hits,
        ),
        ("tickshare_stale_serves_total", "Reads answered with stale data.", stats.stale_serves),
        ("tickshare_revalidations_total", "Background refreshes started.", stats.revalidations),
        ("tickshare_retries_total", "Upstream calls retried.", stats.retries),
        ("tickshare_rate_limited_total", "HTTP 429 answers from the exchange.", stats.rate_limit_errors),
        ("tickshare_candles_fetched_total", "Candles received from the upstream.", stats.candles_fetched),
        ("tickshare_upstream_calls_all_total", "Upstream calls, all endpoints.", stats.upstream_calls),
    ];
    for (name, help, v) in plain {
        out.push(counter(name, help, Vec::new(), v));
    }
    for (kind, n) in &stats.errors_by_kind {
        out.push(counter(
            "tickshare_upstream_errors_total",
            "Upstream errors by kind.",
            vec![("kind", kind.clone())],
            *n,
        ));
    }
    let l = &stats.upstream_latency_ms;
    for (q, v) in [("0.5", l.p50), ("0.9", l.p90), ("0.99", l.p99), ("1", l.max)] {
        out.push(gauge(
            "tickshare_upstream_latency_ms",
            "Upstream latency over the most recent calls, milliseconds.",
            vec![("quantile", q.into())],
            v,
        ));
    }
    out.push(gauge(
        "tickshare_cache_entries",
        "Cached entries (approximate).",
        Vec::new(),
        stats.cache_entries as f64,
    ));
    if let Some(lim) = &stats.limiter {
        for (class, c) in [("public", &lim.public), ("private", &lim.private)] {
            let lab = || vec![("class", class.to_string())];
            out.push(counter(
                "tickshare_limiter_acquired_total",
                "Requests admitted by the rate limiter.",
                lab(),
                c.acquired,
            ));
            out.push(counter("tickshare_limiter_waits_total", "Requests that waited.", lab(), c.waits));
            out.push(counter(
                "tickshare_limiter_rejected_local_total",
                "Requests refused locally.",
                lab(),
                c.rejected_local,
            ));
            out.push(counter("tickshare_limiter_shed_total", "Requests shed.", lab(), c.shed));
            out.push(counter(
                "tickshare_limiter_rate_limit_pauses_total",
                "Pauses after a 429.",
                lab(),
                c.rate_limit_pauses,
            ));
            out.push(gauge(
                "tickshare_limiter_waiting",
                "Requests waiting now.",
                lab(),
                c.waiting_now as f64,
            ));
            out.push(gauge(
                "tickshare_limiter_paused_ms",
                "Remaining pause after a 429, ms.",
                lab(),
                c.paused_for_ms as f64,
            ));
        }
    }
    for (class, b) in [("public", &stats.breaker.public), ("private", &stats.breaker.private)] {
        for state in [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen] {
            out.push(gauge(
                "tickshare_breaker_state",
                "Circuit breaker state (1 for the current one).",
                vec![("class", class.into()), ("state", state.as_str().into())],
                if b.state == state { 1.0 } else { 0.0 },
            ));
        }
        let lab = || vec![("class", class.to_string())];
        out.push(counter("tickshare_breaker_opened_total", "Times the circuit opened.", lab(), b.opened));
        out.push(counter(
            "tickshare_breaker_rejected_total",
            "Calls refused by an open circuit.",
            lab(),
            b.rejected,
        ));
        out.push(counter("tickshare_breaker_probes_total", "Probe calls while half open.", lab(), b.probes));
    }
    out
}

/// Render samples in the Prometheus text exposition format (version 0.0.4), one `# HELP` and
/// `# TYPE` per name.
pub fn render(samples: &[Sample]) -> String {
    let mut out = String::with_capacity(samples.len() * 96);
    let mut seen: Vec<&str> = Vec::new();
    for s in samples {
        if !seen.contains(&s.name) {
            seen.push(s.name);
            let _ = writeln!(out, "# HELP {} {}", s.name, s.help);
            let _ = writeln!(out, "# TYPE {} {}", s.name, if s.counter { "counter" } else { "gauge" });
        }
        out.push_str(s.name);
        if !s.labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in s.labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(out, "{k}=\"{v}\"");
            }
            out.push('}');
        }
        let _ = writeln!(out, " {}", s.value);
    }
    out
}

/// The Prometheus text of a coordinated source's stats: `render(&samples(stats, cfg))`.
pub fn prometheus_text(stats: &CoordinatedStats, cfg: &CoordinatedConfig) -> String {
    render(&samples(stats, cfg))
}

/// Publish samples through the `metrics` facade: counters with
/// [`Counter::absolute`](metrics::Counter::absolute) (they are monotonic snapshots), gauges
/// with `set`. Does nothing without an installed recorder. Call it on your own schedule (the
/// proxy calls it on every `/metrics` scrape).
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn publish(samples: &[Sample]) {
    for s in samples {
        let labels: Vec<metrics::Label> =
            s.labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
        if s.counter {
            metrics::counter!(s.name, labels).absolute(s.value as u64);
        } else {
            metrics::gauge!(s.name, labels).set(s.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_and_labels_once_per_name() {
        let mut stats = CoordinatedStats::default();
        stats.upstream_calls_by_endpoint.insert("ticker".into(), 3);
        stats.upstream_calls_by_endpoint.insert("best_bid_ask".into(), 2);
        stats.cache_hits = 7;
        let text = prometheus_text(&stats, &CoordinatedConfig::default());
        assert!(
            text.contains("tickshare_upstream_calls_total{endpoint=\"ticker\",class=\"public\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tickshare_upstream_calls_total{endpoint=\"best_bid_ask\",class=\"private\"} 2\n")
        );
        assert!(text.contains("tickshare_cache_hits_total 7\n"));
        assert_eq!(text.matches("# TYPE tickshare_upstream_calls_total counter").count(), 1);
        assert!(text.contains("tickshare_breaker_state{class=\"public\",state=\"closed\"} 1\n"));
    }
}
