"""The SDK against a real node, as a trading firm uses it."""

import asyncio
import os
import secrets
import subprocess
import tempfile
from decimal import Decimal
from urllib.parse import urlparse

import pytest

import agora_client
from agora_client import OrderRejected, UnknownMarket

MARKET = "BTC-USDC"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def name(what: str) -> str:
    return f"{what}-{secrets.token_hex(3)}"


async def tidy(client, market, *accounts):
    for a in accounts:
        await client.cancel_all(market, account=a)


async def until(ask, timeout: float = 10.0):
    """``await ask()`` again until it gives something (the history store lags the books)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await ask()
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, "nothing within the time"
        await asyncio.sleep(0.1)


def test_place_fill_and_reports_in_decimals(url):
    async def main():
        client = await agora_client.connect(url)
        seller, buyer = name("alice"), name("bob")
        try:
            placed = await client.place(MARKET, "sell", "0.5", "65000.00", account=seller, cid="s1", wait=10)
            assert [r.type for r in placed] == ["accepted"]
            assert placed[0]["price"] == Decimal("65000.00")
            got = await client.place(MARKET, "buy", Decimal("0.2"), "65000.00", account=buyer, cid="b1", wait=10)
            assert [r.type for r in got] == ["accepted", "fill"]
            fill = got[1]
            assert fill["liquidity"] == "taker"
            assert fill["price"] == Decimal("65000.00") and isinstance(fill["price"], Decimal)
            assert fill["qty"] == Decimal("0.2")
            assert fill["leaves"] == Decimal("0")
            assert fill.stream_seq > 0
        finally:
            await tidy(client, MARKET, seller, buyer)
            await client.close()

    run(main())


def test_refusals_are_typed_and_floats_are_refused(url):
    async def main():
        client = await agora_client.connect(url, account=name("carol"))
        try:
            with pytest.raises(OrderRejected) as refused:
                await client.place(MARKET, "buy", "0.1", "65000.001", cid="c1", wait=10)
            assert refused.value.reason == "invalid_field"
            assert "decimals" in refused.value.message
            with pytest.raises(TypeError):
                await client.place(MARKET, "buy", 0.1, "65000.00", cid="c2")
            with pytest.raises(UnknownMarket):
                await client.place("NOPE-USD", "buy", "1", "1.00", cid="c3")
            # A retry of the same cid is refused, and the first order stands.
            await client.place(MARKET, "buy", "0.1", "60000.00", cid="c4", wait=10)
            with pytest.raises(OrderRejected) as again:
                await client.place(MARKET, "buy", "0.1", "60000.00", cid="c4", wait=10)
            assert again.value.reason == "duplicate_cid"
        finally:
            await client.cancel_all(MARKET)
            await client.close()

    run(main())


def test_open_orders_and_order_status_from_the_books(url):
    async def main():
        client = await agora_client.connect(url)
        maker, taker = name("dave"), name("erin")
        try:
            await client.place(MARKET, "sell", "1", "65500.00", account=maker, cid="m1", wait=10)
            await client.place(MARKET, "sell", "1", "65600.00", account=maker, cid="m2", wait=10)
            await client.place(MARKET, "buy", "0.25", "65500.00", account=taker, cid="t1", wait=10)
            await client.place(
                MARKET, "buy", "0.1", account=maker, cid="m3", type="stop_market", tif="ioc",
                stop_price="90000.00", wait=10,
            )
            open_ = await client.open_orders(account=maker)
            assert open_.missing == []
            assert set(open_.as_of) == {"BTC-USDC", "ETH-USDC", "SOL-USDC"}
            by_cid = {o.cid: o for o in open_.orders}
            assert set(by_cid) == {"m1", "m2", "m3"}
            assert by_cid["m1"].filled == Decimal("0.25") and by_cid["m1"].leaves == Decimal("0.75")
            assert by_cid["m2"].status == "open" and by_cid["m2"].filled == 0
            assert by_cid["m3"].status == "untriggered" and by_cid["m3"].stop_price == Decimal("90000.00")
            one = await client.order_status(MARKET, cid="m1", account=maker)
            assert one == by_cid["m1"]
            by_oid = await client.order_status(MARKET, oid=one.oid, account=maker)
            assert by_oid == one
            # Another account cannot see it.
            assert await client.order_status(MARKET, oid=one.oid, account=taker) is None
            await client.cancel(MARKET, cid="m1", account=maker, wait=10)
            # Closed: the books no longer have it; the history store (running beside the node
            # here) answers it once written.
            closed = await until(lambda: client.order_status(MARKET, cid="m1", account=maker))
            assert closed.status == "cancelled" and closed.reason == "user"
            assert closed.filled == Decimal("0.25") and closed.leaves == 0
        finally:
            await tidy(client, MARKET, maker, taker)
            await client.close()

    run(main())


def test_a_batch_places_several_orders_in_one_message(url):
    async def main():
        client = await agora_client.connect(url, account=name("mm"))
        try:
            quotes = [
                client.order("buy", "0.1", "64000.00", cid="q1"),
                client.order("sell", "0.1", "66000.00", cid="q2"),
            ]
            reports = client.reports(market=MARKET)
            await reports.start()
            sent = await client.batch(MARKET, quotes)
            assert sent.oids == (sent.seq * 1000, sent.seq * 1000 + 1)
            seen = [await reports.next(timeout=10), await reports.next(timeout=10)]
            assert [(r.type, r.cid, r["oid"]) for r in seen] == [
                ("accepted", "q1", sent.oids[0]),
                ("accepted", "q2", sent.oids[1]),
            ]
            await reports.close()
        finally:
            await client.cancel_all(MARKET)
            await client.close()

    run(main())


def test_the_book_and_the_tape_follow_the_market(url):
    async def main():
        client = await agora_client.connect(url)
        maker, taker = name("fay"), name("gus")
        try:
            book = client.book("ETH-USDC")
            first = await book.next(timeout=10)
            assert first.seq >= 0
            tape = client.trades("ETH-USDC")
            await tape.start()
            await client.place("ETH-USDC", "sell", "2", "3500.00", account=maker, cid="e1", wait=10)
            while not any(l.price == Decimal("3500.00") for l in book.asks):
                await book.next(timeout=10)
            level = next(l for l in book.asks if l.price == Decimal("3500.00"))
            assert level.qty == Decimal("2") and level.orders == 1
            await client.place("ETH-USDC", "buy", "0.5", "3500.00", account=taker, cid="e2", wait=10)
            trade = await tape.next(timeout=10)
            assert (trade.price, trade.qty, trade.taker_side) == (Decimal("3500.00"), Decimal("0.5"), "buy")
            while next((l.qty for l in book.asks if l.price == Decimal("3500.00")), None) != Decimal("1.5"):
                await book.next(timeout=10)
            await book.close()
            await tape.close()
        finally:
            await tidy(client, "ETH-USDC", maker, taker)
            await client.close()

    run(main())


def test_reports_catch_up_after_a_restart_with_nothing_missed_or_twice(url):
    async def main():
        account = name("hal")
        client = await agora_client.connect(url, account=account)
        try:
            first = client.reports(market=MARKET)
            await first.start()
            await client.place(MARKET, "buy", "0.1", "61000.00", cid="h1")
            r = await first.next(timeout=10)
            assert r.cid == "h1"
            resume_at = first.last_stream_seq + 1
            await first.close()
            # Away: three more orders.
            for cid in ("h2", "h3", "h4"):
                await client.place(MARKET, "buy", "0.1", "61000.00", cid=cid)
            back = client.reports(market=MARKET, since=resume_at)
            seen = [(await back.next(timeout=10)).cid for _ in range(3)]
            assert seen == ["h2", "h3", "h4"]
            with pytest.raises(asyncio.TimeoutError):
                await back.next(timeout=1)
            await back.close()
        finally:
            await client.cancel_all(MARKET)
            await client.close()

    run(main())


def test_a_lost_connection_misses_nothing(url):
    from conftest import Proxy

    async def main():
        account = name("ivy")
        target = urlparse(url.split(",")[0])
        proxy = Proxy(target.hostname, target.port)
        await proxy.start()
        direct = await agora_client.connect(url, account=account)
        behind = await agora_client.connect(proxy.url, account=account)
        try:
            reports = behind.reports(market=MARKET)
            await reports.start()
            cids = []

            async def place(n):
                for _ in range(n):
                    cid = f"i{len(cids)}"
                    cids.append(cid)
                    await direct.place(MARKET, "buy", "0.1", "60500.00", cid=cid)

            await place(3)
            got = [(await reports.next(timeout=10)).cid for _ in range(3)]
            await proxy.cut()
            await place(5)  # while the reader's connection is down
            await asyncio.sleep(1.0)
            await proxy.restore()
            await place(2)
            while len(got) < 10:
                got.append((await reports.next(timeout=30)).cid)
            assert got == cids, "every report once, in order"
            with pytest.raises(asyncio.TimeoutError):
                await reports.next(timeout=1)
            await reports.close()
        finally:
            await direct.cancel_all(MARKET)
            await behind.close()
            await direct.close()
            await proxy.cut()

    run(main())


def test_market_status_says_who_runs_a_new_market(url):
    agora = os.environ.get("AGORA_BIN")
    if not agora:
        raise RuntimeError("AGORA_BIN is not set: the agora binary runs `agora ctl market.add`")

    async def main():
        client = await agora_client.connect(url)
        symbol = f"PY{secrets.token_hex(2).upper()}-USD"
        try:
            feed = client.status(symbol)
            await feed.start()
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as spec:
                spec.write(f'symbol = "{symbol}"\nprice_decimals = 2\nsize_decimals = 0\n')
            done = subprocess.run(
                [agora, "ctl", "market.add", "--spec", spec.name, "--nats-url", url],
                capture_output=True, text=True, timeout=30,
            )
            assert done.returncode == 0, done.stderr
            status = await feed.next(timeout=10)
            while status.state != "active":
                status = await feed.next(timeout=10)
            assert status.market == symbol and status.node and status.epoch >= 1
            await feed.close()
        finally:
            await client.close()

    run(main())


def test_history_answers_closed_orders_fills_and_the_tape(url):
    async def main():
        client = await agora_client.connect(url)
        maker, taker = name("hana"), name("ivan")
        try:
            await client.place(MARKET, "sell", "0.5", "64000.00", account=maker, cid="h1", wait=10)
            await client.place(MARKET, "buy", "0.5", "64000.00", account=taker, cid="h2", wait=10)
            mine = await until(
                lambda: _filled(client.history(account=maker, market=MARKET))
            )
            order = mine.orders[0]
            assert order.cid == "h1" and order.status == "filled"
            assert order.avg_price == Decimal("64000.00") and order.leaves == 0
            fill = mine.fills[0]
            assert fill["liquidity"] == "maker" and fill["qty"] == Decimal("0.50000000")
            # The filled order is answered from the history, with how it ended.
            done = await client.order_status(MARKET, cid="h2", account=taker)
            assert done.status == "filled" and done.filled == Decimal("0.5")
            # The public tape, candles and ticker.
            trades = await client.trade_history(MARKET, limit=5)
            assert trades[0]["price"] == Decimal("64000.00")
            candles = await client.candles(MARKET, "1m")
            assert candles and candles[-1]["close"] == Decimal("64000.00")
            ticker = await client.ticker(MARKET)
            assert ticker["last"] == Decimal("64000.00") and ticker["trades_24h"] >= 1
        finally:
            await tidy(client, MARKET, maker, taker)
            await client.close()

    run(main())


async def _filled(history_coro):
    h = await history_coro
    return h if h.orders and h.orders[0].status == "filled" and h.fills else None
