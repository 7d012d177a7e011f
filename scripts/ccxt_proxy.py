#!/usr/bin/env python3
"""ccxt against the tickshare proxy: load_markets, fetch_ticker(s), fetch_ohlcv, fetch_balance.

    cargo run --example proxy --features proxy -- --listen 127.0.0.1:8787 --sim   # or --upstream URL
    pip install ccxt
    TICKSHARE_PROXY_TOKEN=... python3 scripts/ccxt_proxy.py [http://127.0.0.1:8787]

Two ways to authenticate to the proxy:
  * token mode (TICKSHARE_PROXY_TOKEN set, no key here): ccxt sends the local token on every
    call, public and private; the CDP key lives only in the proxy, which signs upstream.
  * key mode (COINBASE_API_KEY / COINBASE_API_SECRET set to the proxy's own CDP key): ccxt signs
    private calls itself, the proxy verifies them with the key's public half; public calls still
    need the token (ccxt sends no Authorization on public endpoints).
"""
import os
import sys
import time

import ccxt

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8787"
token = os.environ.get("TICKSHARE_PROXY_TOKEN")
key, secret = os.environ.get("COINBASE_API_KEY"), os.environ.get("COINBASE_API_SECRET")

config = {"urls": {"api": {"rest": base}}, "enableRateLimit": True}
if key and secret:
    config.update({"apiKey": key, "secret": secret.replace("\\n", "\n")})
    if token:
        config["headers"] = {"X-Tickshare-Token": token}
elif token:
    # ccxt's sign() uses a configured Authorization header for private calls as it is.
    config["headers"] = {"Authorization": "Bearer " + token}
else:
    sys.exit("set TICKSHARE_PROXY_TOKEN (and optionally COINBASE_API_KEY/COINBASE_API_SECRET)")

ex = ccxt.coinbase(config)
t0 = time.time()
markets = ex.load_markets()
print(f"load_markets: {len(markets)} markets, e.g. {sorted(markets)[:3]}")
ticker = ex.fetch_ticker("BTC/USD")
print(f"fetch_ticker BTC/USD: last={ticker['last']} bid={ticker['bid']} ask={ticker['ask']}")
tickers = ex.fetch_tickers(["BTC/USD", "ETH/USD"])
print("fetch_tickers:", {s: t["last"] for s, t in tickers.items()})
ohlcv = ex.fetch_ohlcv("BTC/USD", "1m", limit=5)
print(f"fetch_ohlcv BTC/USD 1m: {len(ohlcv)} candles, last {ohlcv[-1]}")
balance = ex.fetch_balance()
print("fetch_balance total:", {k: v for k, v in balance["total"].items() if v})
print(f"done in {time.time() - t0:.2f}s")
