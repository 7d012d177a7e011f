#!/usr/bin/env python3
"""The official Coinbase Advanced Trade Python SDK (coinbase-advanced-py) against the tickshare proxy.

The SDK always builds https://{base_url}{path}, so the proxy is reached through a TLS terminator
on loopback (socat here; caddy, nginx or stunnel do the same):

    openssl ecparam -name prime256v1 -genkey -noout -out key.pem            # the proxy's CDP key
    openssl req -x509 -newkey rsa:2048 -nodes -keyout tls.key -out tls.crt -days 30 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost
    COINBASE_API_KEY=organizations/local/apiKeys/proxy COINBASE_API_SECRET="$(cat key.pem)" \
        cargo run --example proxy --features proxy -- --listen 127.0.0.1:8787 --sim
    socat OPENSSL-LISTEN:8443,reuseaddr,fork,cert=tls.crt,key=tls.key,verify=0 TCP:127.0.0.1:8787 &
    pip install coinbase-advanced-py
    REQUESTS_CA_BUNDLE=tls.crt COINBASE_API_KEY=... COINBASE_API_SECRET="$(cat key.pem)" \
        python3 scripts/sdk_proxy.py localhost:8443 [--trade]

--trade also places orders wherever the proxy's upstream is (a limit buy far below the market,
listed and cancelled, then a market buy of 10 USD and its fills): use it against the simulator.

The SDK signs every call with the key (JWT `uri` = "GET localhost:8443/api/v3/brokerage/..."); the
proxy verifies it with the same key's public half (the host in `uri` is not checked) and signs its
own upstream requests. Its public-endpoint methods (get_public_*) send no Authorization, so a proxy
with a local token only answers them with that token, which the SDK cannot send: use the
authenticated methods below.
"""
import os
import sys
import time

from coinbase.rest import RESTClient

args = [a for a in sys.argv[1:] if not a.startswith("--")]
trade = "--trade" in sys.argv[1:]
host = args[0] if args else "localhost:8443"
key, secret = os.environ.get("COINBASE_API_KEY"), os.environ.get("COINBASE_API_SECRET")
if not (key and secret):
    sys.exit("set COINBASE_API_KEY and COINBASE_API_SECRET to the proxy's own CDP key")

client = RESTClient(api_key=key, api_secret=secret.replace("\\n", "\n"), base_url=host)
t0 = time.time()
product = client.get_product("BTC-USD")
print(f"get_product BTC-USD: price={product.price} status={product.status}")
bba = client.get_best_bid_ask(product_ids=["BTC-USD", "ETH-USD"])
print("get_best_bid_ask:", {b.product_id: (b.bids[0].price, b.asks[0].price) for b in bba.pricebooks})
end = int(time.time()) // 3600 * 3600
candles = client.get_candles("BTC-USD", start=str(end - 5 * 3600), end=str(end), granularity="ONE_HOUR")
last = candles.candles[0]
print(f"get_candles BTC-USD ONE_HOUR: {len(candles.candles)} candles, newest start={last.start} close={last.close}")
accounts = client.get_accounts()
print("get_accounts:", {a.currency: a.available_balance["value"] for a in accounts.accounts})
if trade:
    bid = float(bba.pricebooks[0].bids[0].price)
    limit = client.limit_order_gtc_buy(
        client_order_id="", product_id="BTC-USD", base_size="0.001", limit_price=f"{bid * 0.5:.2f}"
    )
    print(f"limit_order_gtc_buy: success={limit.success} order_id={limit.order_id}")
    opened = client.list_orders(order_status=["OPEN"], product_ids=["BTC-USD"])
    print("list_orders OPEN:", [(o.order_id, o.status, o.outstanding_hold_amount) for o in opened.orders])
    cancelled = client.cancel_orders(order_ids=[limit.order_id])
    print("cancel_orders:", [(r.order_id, r.success) for r in cancelled.results])
    bought = client.market_order_buy(client_order_id="", product_id="BTC-USD", quote_size="10")
    order = client.get_order(bought.order_id).order
    print(f"market_order_buy 10 USD: {order.status} filled_size={order.filled_size} "
          f"average={order.average_filled_price} fees={order.total_fees}")
    fills = client.get_fills(order_ids=[bought.order_id])
    print("get_fills:", [(f.liquidity_indicator, f.price, f.size, f.size_in_quote) for f in fills.fills])
    after = client.get_accounts()
    print("get_accounts after:", {a.currency: a.available_balance["value"] for a in after.accounts if a.currency in ("USD", "BTC")})
print(f"({time.time() - t0:.2f} s)")
