"""Alice sells, Bob buys: two crossing orders on a running Agora node, Bob's fill, what Alice
still has open (asked from the book), then Alice cancels it. Each trader publishes on her own
subject (agora.orders.<MARKET>.<ACCOUNT>), as NATS permissions would require of a trader.

    pip install ./clients/python
    python3 examples/python/place_order.py nats://127.0.0.1:4222   # the URL the node printed
"""
import asyncio
import secrets
import sys

import agora_client


async def main(url: str) -> None:
    alice = await agora_client.connect(url, account="alice")
    bob = await agora_client.connect(url, account="bob")
    # cids of this run only: run it again and nothing is refused duplicate_cid.
    run = secrets.token_hex(3)
    sell_cid, buy_cid = f"ex-{run}-sell", f"ex-{run}-buy"

    accepted = await alice.place("BTC-USDC", "sell", "0.5", "65000.00", cid=sell_cid, wait=10)
    print(f"alice sell accepted: oid {accepted[0]['oid']} at stream seq {accepted[0].seq}")
    for report in await bob.place("BTC-USDC", "buy", "0.2", "65000.00", cid=buy_cid, wait=10):
        print("bob", report.type, report.get("side"), report.get("qty"), "@", report.get("price"), report.get("liquidity", ""))

    mine = await alice.order_status("BTC-USDC", cid=sell_cid)
    print(f"alice still has {mine.leaves} of {mine.qty} open at {mine.price} (filled {mine.filled})")
    await alice.cancel("BTC-USDC", cid=sell_cid, wait=10)
    print("alice cancelled the rest; open orders of alice now:", len((await alice.open_orders()).orders))
    await alice.close()
    await bob.close()


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
