"""Place two crossing orders on a running Agora node and print bob's execution reports.

    pip install -r examples/python/requirements.txt
    python3 examples/python/place_order.py nats://127.0.0.1:4222   # the URL the node printed
"""
import asyncio
import sys

import msgpack
import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    reports = await nc.subscribe("agora.execs.bob.>")  # bob's execution reports, all markets
    sell = {"op": "new", "account": "alice", "cid": "a1", "side": "sell", "price": "65000.00", "qty": "0.5"}
    buy = {"op": "new", "account": "bob", "cid": "b1", "side": "buy", "price": "65000.00", "qty": "0.2"}
    for order in (sell, buy):
        ack = await js.publish("agora.orders.BTC-USDC", msgpack.packb(order))  # fails at once for an unknown market
        print(f"{order['account']} {order['side']} accepted by the stream at seq {ack.seq} (oid {ack.seq * 1000})")
    while True:
        for report in msgpack.unpackb((await reports.next_msg(timeout=10)).data)["reports"]:
            print(report["type"], report.get("side"), report.get("qty"), "@", report.get("price"), report.get("liquidity", ""))
            if report["type"] == "fill":
                await nc.close()
                return


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
