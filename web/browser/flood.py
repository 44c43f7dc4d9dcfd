"""A market made up for measuring the web page: publishes L2 deltas for one symbol on
<prefix>.book.<MARKET> at a steady rate (changes around a moving mid, levels appearing and
going), answers <prefix>.book.<MARKET>.snapshot with its book as the engine would, and prints
its sequence once a second. With a node's page open on #/market/<MARKET>, the page's ladder
must follow it (web/browser/measure.mjs reads how well).

    python3 web/browser/flood.py NATS_URL [--market FLOOD-USD] [--rate 10000] [--secs 60]
"""
import argparse
import asyncio
import random
import time

import msgpack
import nats


def price(ticks: int) -> str:
    return f"{ticks // 100}.{ticks % 100:02d}"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--market", default="FLOOD-USD")
    ap.add_argument("--prefix", default="agora")
    ap.add_argument("--rate", type=int, default=10000)
    ap.add_argument("--secs", type=float, default=60)
    a = ap.parse_args()
    nc = await nats.connect(a.url)
    rnd = random.Random(7)
    books = {"buy": {}, "sell": {}}
    mid = 1_000_000
    seq = 0
    subject = f"{a.prefix}.book.{a.market}"

    async def snapshot(msg):
        side = lambda s, rev: [
            {"price": price(p), "qty": f"{q}.000", "orders": o}
            for p, (q, o) in sorted(books[s].items(), reverse=rev)
        ]
        body = {"market": a.market, "seq": seq, "bids": side("buy", True), "asks": side("sell", False)}
        await msg.respond(msgpack.packb(body))

    await nc.subscribe(f"{subject}.snapshot", cb=snapshot)
    started = time.monotonic()
    sent = 0
    last_print = started
    while time.monotonic() - started < a.secs:
        # Publish what is due by now, then yield.
        due = int((time.monotonic() - started) * a.rate)
        while sent < due:
            mid += rnd.choice((-1, 0, 1))
            changes = []
            for _ in range(rnd.randint(1, 3)):
                side = rnd.choice(("buy", "sell"))
                p = mid - rnd.randint(1, 40) if side == "buy" else mid + rnd.randint(1, 40)
                if p in books[side] and rnd.random() < 0.4:
                    del books[side][p]
                    changes.append({"side": side, "price": price(p), "qty": "0.000", "orders": 0})
                else:
                    q, o = rnd.randint(1, 500), rnd.randint(1, 9)
                    books[side][p] = (q, o)
                    changes.append({"side": side, "price": price(p), "qty": f"{q}.000", "orders": o})
            # Crossed levels go, as in a real book.
            best_ask = min(books["sell"], default=None)
            for p in [p for p in books["buy"] if best_ask is not None and p >= best_ask]:
                del books["buy"][p]
                changes.append({"side": "buy", "price": price(p), "qty": "0.000", "orders": 0})
            prev, seq = seq, seq + 1
            await nc.publish(subject, msgpack.packb(
                {"market": a.market, "seq": seq, "prev_seq": prev, "changes": changes}))
            sent += 1
        now = time.monotonic()
        if now - last_print >= 1:
            print(f"seq {seq}", flush=True)
            last_print = now
        await asyncio.sleep(0.002)
    await nc.flush()
    print(f"done seq {seq}", flush=True)
    await asyncio.sleep(3)  # snapshot requests of a page catching up
    await nc.close()


asyncio.run(main())
