#!/usr/bin/env python3
"""ccxt against the tickshare proxy: load_markets, fetch_ticker(s), fetch_order_book, fetch_trades,
fetch_ohlcv, fetch_balance; with --trade also create_order (limit and market), fetch_open_orders,
cancel_order, fetch_order, fetch_my_trades and the balance after the fill.

    cargo run --example proxy --features proxy,sim -- --listen 127.0.0.1:8787 --sim   # or --upstream URL
    pip install ccxt
    TICKSHARE_PROXY_TOKEN=... python3 scripts/ccxt_proxy.py [http://127.0.0.1:8787] [--trade]

--trade places real orders wherever the proxy's upstream is (a small limit buy far below the
market, cancelled, and a market buy of 10 USD): use it against the simulator, not a funded key.

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

args = [a for a in sys.argv[1:] if not a.startswith("--")]
trade = "--trade" in sys.argv[1:]
base = args[0] if args else "http://127.0.0.1:8787"
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
book = ex.fetch_order_book("BTC/USD", limit=3)
print(f"fetch_order_book BTC/USD: bids={book['bids'][:2]} asks={book['asks'][:2]}")
trades = ex.fetch_trades("BTC/USD", limit=3)
print(f"fetch_trades BTC/USD: {len(trades)} trades, last price={trades[0]['price']}")
ohlcv = ex.fetch_ohlcv("BTC/USD", "1m", limit=5)
print(f"fetch_ohlcv BTC/USD 1m: {len(ohlcv)} candles, last {ohlcv[-1]}")
balance = ex.fetch_balance()
print("fetch_balance total:", {k: v for k, v in balance["total"].items() if v})
if trade:
    bid = book["bids"][0][0]
    resting = ex.create_order("BTC/USD", "limit", "buy", 0.001, round(bid * 0.5, 2))
    print(f"create_order limit buy 0.001 @ {round(bid * 0.5, 2)}: id={resting['id']}")
    open_orders = ex.fetch_open_orders("BTC/USD")
    print(f"fetch_open_orders: {[(o['id'], o['status'], o['price']) for o in open_orders]}")
    usd = ex.fetch_balance({"v3": True})["USD"]  # v3 accounts carry the hold; v2 only totals
    print(f"fetch_balance v3 USD: free={usd['free']} used={usd['used']}")
    ex.cancel_order(resting["id"])
    print(f"cancel_order -> fetch_order status: {ex.fetch_order(resting['id'])['status']}")
    ask = book["asks"][0][0]
    bought = ex.create_order("BTC/USD", "market", "buy", 10 / ask, ask)
    filled = ex.fetch_order(bought["id"])
    print(f"create_order market buy 10 USD: status={filled['status']} filled={filled['filled']} "
          f"average={filled['average']} fee={filled['fee']['cost']}")
    mine = ex.fetch_my_trades("BTC/USD")
    print(f"fetch_my_trades: {[(t['side'], t['price'], t['amount'], t['takerOrMaker']) for t in mine]}")
    after = ex.fetch_balance()
    print("fetch_balance after the fill:", {k: after["total"][k] for k in ("USD", "BTC")})
print(f"done in {time.time() - t0:.2f}s")
