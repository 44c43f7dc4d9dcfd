"""The asyncio client: commands, reports with catch-up, the tape, the book, queries, status."""

import asyncio
import secrets
from decimal import Decimal
from typing import Any, Dict, Iterable, List, Optional, Union

import msgpack
import nats
import nats.errors
import nats.js.errors

from ._reader import OrderedReader, Start
from .errors import NotAcknowledged, OrderRejected, QueryRefused, Timeout, UnknownMarket
from .types import (
    Amount,
    History,
    Level,
    MarketStatus,
    OpenOrders,
    Order,
    Report,
    Sent,
    Trade,
    decimals,
    to_wire,
)


async def connect(
    servers: Union[str, List[str]] = "nats://127.0.0.1:4222",
    *,
    account: Optional[str] = None,
    user: Optional[str] = None,
    password: Optional[str] = None,
    token: Optional[str] = None,
    creds: Optional[str] = None,
    inbox_prefix: Optional[str] = None,
    prefix: str = "agora",
) -> "Client":
    """Connects to NATS. ``servers`` is a URL, a comma-separated list, or a list (a
    ``user:password@`` in a URL logs in). ``account`` is the default account of the commands
    and queries. Replies go to ``_INBOX_<user>`` with a user login, as the reference
    permissions expect. The connection reconnects by itself, for ever."""
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    if inbox_prefix is None:
        login = user or _url_user(servers)
        inbox_prefix = f"_INBOX_{login}" if login else "_INBOX"
    options: Dict[str, Any] = dict(
        servers=servers,
        inbox_prefix=inbox_prefix.encode(),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        allow_reconnect=True,
    )
    if user is not None:
        options["user"] = user
    if password is not None:
        options["password"] = password
    if token is not None:
        options["token"] = token
    if creds is not None:
        options["user_credentials"] = creds
    nc = await nats.connect(**options)
    return Client(nc, prefix=prefix, account=account, inbox_prefix=inbox_prefix)


def _url_user(servers: List[str]) -> Optional[str]:
    for s in servers:
        rest = s.split("://", 1)[-1]
        if "@" in rest:
            who = rest.split("@", 1)[0]
            return who.split(":", 1)[0] or None
    return None


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class Client:
    """One connection to Agora. Create it with ``await agora_client.connect(...)``."""

    def __init__(self, nc, *, prefix: str = "agora", account: Optional[str] = None, inbox_prefix: str = "_INBOX"):
        self._nc = nc
        self._js = nc.jetstream()
        self._prefix = prefix
        self._account = account
        self._inbox = inbox_prefix

    @property
    def nats(self):
        """The underlying nats-py connection."""
        return self._nc

    async def close(self) -> None:
        await self._nc.drain()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _who(self, account: Optional[str]) -> str:
        who = account or self._account
        if not who:
            raise ValueError("no account: pass account=..., or connect(..., account=...)")
        return who

    # ----- commands -----------------------------------------------------------------------

    async def send(self, market: str, command: Dict[str, Any], timeout: float = 5.0) -> Sent:
        """Publishes one command (a map of the protocol) on the account's own subject and
        waits for JetStream's acknowledgement."""
        account = self._who(command.get("account"))
        command = {**command, "account": account}
        subject = f"{self._prefix}.orders.{market}.{account}"
        try:
            ack = await self._js.publish(subject, _pack(command), timeout=timeout)
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
            raise UnknownMarket(market) from None
        except nats.errors.TimeoutError as e:
            raise NotAcknowledged(subject, str(e) or "timeout") from None
        except nats.js.errors.APIError as e:
            raise NotAcknowledged(subject, str(e)) from None
        oids = ()
        if command.get("op") == "batch":
            oids = tuple(ack.seq * 1000 + i for i in range(len(command.get("commands", []))))
        return Sent(market=market, seq=ack.seq, cid=command.get("cid"), oids=oids)

    @staticmethod
    def order(
        side: str,
        qty: Amount,
        price: Optional[Amount] = None,
        *,
        cid: Optional[str] = None,
        type: Optional[str] = None,
        tif: Optional[str] = None,
        stop_price: Optional[Amount] = None,
        display_qty: Optional[Amount] = None,
        expire_at: Optional[int] = None,
        stp: Optional[str] = None,
    ) -> Dict[str, Any]:
        """A ``new`` command as a map (for ``batch``); prices and quantities as decimals."""
        command: Dict[str, Any] = {"op": "new", "side": side, "qty": to_wire("qty", qty)}
        if price is not None:
            command["price"] = to_wire("price", price)
        if stop_price is not None:
            command["stop_price"] = to_wire("stop_price", stop_price)
        if display_qty is not None:
            command["display_qty"] = to_wire("display_qty", display_qty)
        for key, value in (("cid", cid), ("type", type), ("tif", tif), ("expire_at", expire_at), ("stp", stp)):
            if value is not None:
                command[key] = value
        return command

    async def place(
        self,
        market: str,
        side: str,
        qty: Amount,
        price: Optional[Amount] = None,
        *,
        account: Optional[str] = None,
        wait: Optional[float] = None,
        **fields: Any,
    ) -> Union[Sent, List[Report]]:
        """Places an order (``type``: limit by default, market, stop_limit, stop_market; ``tif``,
        ``cid``, ``stop_price``, ``display_qty``, ``expire_at``, ``stp``). Without ``wait`` it
        returns what the stream stored; with ``wait`` (seconds) the order's reports, raising
        ``OrderRejected`` if the market refused it. Send a ``cid`` with anything you may retry."""
        command = {**self.order(side, qty, price, **fields), "account": self._who(account)}
        return await self._send_and_wait(market, command, wait)

    async def cancel(
        self,
        market: str,
        *,
        cid: Optional[str] = None,
        oid: Optional[int] = None,
        account: Optional[str] = None,
        wait: Optional[float] = None,
    ) -> Union[Sent, List[Report]]:
        """Cancels an open order by ``cid`` or ``oid``."""
        command = {"op": "cancel", "account": self._who(account), **_target(cid, oid)}
        return await self._send_and_wait(market, command, wait)

    async def amend(
        self,
        market: str,
        *,
        cid: Optional[str] = None,
        oid: Optional[int] = None,
        qty: Optional[Amount] = None,
        price: Optional[Amount] = None,
        account: Optional[str] = None,
        wait: Optional[float] = None,
    ) -> Union[Sent, List[Report]]:
        """Amends an open order: ``qty`` is the new total, filled included; a new price loses
        time priority, a lower quantity keeps it."""
        command: Dict[str, Any] = {"op": "amend", "account": self._who(account), **_target(cid, oid)}
        if qty is not None:
            command["qty"] = to_wire("qty", qty)
        if price is not None:
            command["price"] = to_wire("price", price)
        return await self._send_and_wait(market, command, wait)

    async def cancel_all(self, market: str, *, account: Optional[str] = None) -> Sent:
        """Cancels every open order of the account in the market (resting and stops)."""
        return await self.send(market, {"op": "cancel_all", "account": self._who(account)})

    async def batch(self, market: str, commands: Iterable[Dict[str, Any]], *, account: Optional[str] = None) -> Sent:
        """Several commands in one message (at most the market's batch limit, 100 by
        default): one stream sequence, each command's order id in ``Sent.oids``."""
        cmds = [dict(c) for c in commands]
        return await self.send(market, {"op": "batch", "account": self._who(account), "commands": cmds})

    async def _send_and_wait(self, market: str, command: Dict[str, Any], wait: Optional[float]):
        if wait is None:
            return await self.send(market, command)
        account = command["account"]
        # Listen before sending, so the reports cannot pass by unseen.
        reader = self.reports(account=account, market=market, since="now")
        await reader.start()
        try:
            sent = await self.send(market, command)
            found: List[Report] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    if found:
                        break
                    raise Timeout(
                        f"{market}: no report for seq {sent.seq} within {wait} s",
                        "is the market running? (agora ctl market.list)",
                    )
                try:
                    report = await reader.next(timeout=left)
                except asyncio.TimeoutError:
                    continue
                if report.seq == sent.seq:
                    found.append(report)
                elif report.seq > sent.seq and found:
                    break
                # The command's reports come in one message: stop after it.
                if found and reader.pending_in_message == 0:
                    break
            for r in found:
                if r.type == "rejected":
                    raise OrderRejected(r.fields)
            return found
        finally:
            await reader.close()

    # ----- reading ------------------------------------------------------------------------

    def reports(self, account: Optional[str] = None, market: Optional[str] = None, since: Start = "now") -> "Reports":
        """The account's execution reports (every market, or one), each once and in order,
        from ``since``: ``"now"``, ``"all"``, a stream sequence of ``EXECS`` (a report's
        ``stream_seq + 1`` goes on after it) or a ``datetime``. It goes on by itself after a
        lost connection, missing nothing. Use ``async for report in client.reports(...)``."""
        account = self._who(account)
        subject = f"{self._prefix}.execs.{account}.{market or '>'}"
        return Reports(OrderedReader(self._nc, "EXECS", subject, since, self._inbox))

    def trades(self, market: str) -> "Tape":
        """The market's public tape, live (core NATS): ``async for trade in client.trades(m)``
        (or ``await tape.start()`` first, to be subscribed before acting). Each trade carries
        its ``TRADES`` stream sequence; a gap (a slow subscriber's lost message) raises
        ``Timeout`` saying what was missed, rather than skipping it silently."""
        return Tape(self, market)

    def book(self, market: str, depth: int = 50) -> "Book":
        """The market's L2 book kept locally from its snapshot and deltas, asked again on a
        gap. ``async for book in client.book(m)`` yields it after each change."""
        return Book(self, market, depth)

    def status(self, market: str = "*") -> "StatusFeed":
        """Who runs the market (or every market) and its state, as it changes; an epoch older
        than one already seen is left out (a paused node may speak after its successor)."""
        return StatusFeed(self, market)

    # ----- queries ------------------------------------------------------------------------

    async def open_orders(
        self, account: Optional[str] = None, market: Optional[str] = None, timeout: float = 2.0
    ) -> OpenOrders:
        """The account's open orders (resting and untriggered stops) in every market, or
        one, from the books themselves; every page of them."""
        account = self._who(account)
        subject = f"{self._prefix}.query.{account}.orders"
        result = OpenOrders()
        after = None
        while True:
            body: Dict[str, Any] = {"timeout_ms": int(timeout * 1000)}
            if market:
                body["market"] = market
            if after:
                body["after"] = after
            page = await self._query(subject, body, timeout)
            result.orders.extend(Order.from_wire(o) for o in page.get("orders", []))
            result.as_of.update(page.get("as_of", {}))
            for m in page.get("missing", []):
                if m not in result.missing:
                    result.missing.append(m)
            if page.get("truncated") and page.get("next"):
                after = page["next"]
            else:
                return result

    async def order_status(
        self,
        market: str,
        *,
        cid: Optional[str] = None,
        oid: Optional[int] = None,
        account: Optional[str] = None,
        timeout: float = 2.0,
    ) -> Optional[Order]:
        """One order of the account by ``cid`` or ``oid``: an open one from the books; a closed
        one (``filled``, ``cancelled``, ``expired``, ``rejected``) from the history store when
        ``agora history`` runs. ``None`` when no order is known (never placed, or closed
        without a history store)."""
        account = self._who(account)
        body: Dict[str, Any] = {"market": market, "timeout_ms": int(timeout * 1000), **_target(cid, oid)}
        try:
            reply = await self._query(f"{self._prefix}.query.{account}.order", body, timeout)
        except QueryRefused as e:
            if e.error == "not_open":
                return None
            raise
        return Order.from_wire(reply["order"])

    # ----- the history store (agora history) ------------------------------------------

    async def history(
        self,
        account: Optional[str] = None,
        market: Optional[str] = None,
        since: Optional[int] = None,
        until: Optional[int] = None,
        limit: int = 1000,
        timeout: float = 5.0,
    ) -> History:
        """The account's orders and fills from the history store, newest first, at most
        ``limit`` items over every page; ``since``/``until`` in nanoseconds since the epoch."""
        account = self._who(account)
        subject = f"{self._prefix}.query.{account}.history"
        out = History()
        body: Dict[str, Any] = {}
        if market:
            body["market"] = market
        if since is not None:
            body["from"] = since
        if until is not None:
            body["to"] = until
        while True:
            left = limit - len(out.orders) - len(out.fills)
            body["limit"] = max(1, min(left, 1000))
            page = await self._query(subject, body, timeout)
            out.orders.extend(Order.from_wire(o) for o in page.get("orders", []))
            out.fills.extend(decimals(f) for f in page.get("fills", []))
            nxt = page.get("next")
            if nxt is None or len(out.orders) + len(out.fills) >= limit or not (page.get("orders") or page.get("fills")):
                return out
            body["before"] = nxt

    async def trade_history(self, market: str, limit: int = 100, timeout: float = 5.0) -> List[Dict[str, Any]]:
        """The market's last trades from the history store, newest first."""
        subject = f"{self._prefix}.query.trades.{market}"
        out: List[Dict[str, Any]] = []
        body: Dict[str, Any] = {}
        while len(out) < limit:
            body["limit"] = min(limit - len(out), 1000)
            page = await self._query(subject, body, timeout)
            out.extend(decimals(t) for t in page.get("trades", []))
            if not page.get("next"):
                break
            body["before"] = page["next"]
        return out

    async def candles(
        self, market: str, interval: str = "1m", since: Optional[int] = None, until: Optional[int] = None,
        timeout: float = 5.0,
    ) -> List[Dict[str, Any]]:
        """Candles (``t, open, high, low, close, volume, trades``), oldest first: ``1m``,
        ``5m``, ``1h`` or ``1d``."""
        body: Dict[str, Any] = {"interval": interval}
        if since is not None:
            body["from"] = since
        if until is not None:
            body["to"] = until
        page = await self._query(f"{self._prefix}.query.candles.{market}", body, timeout)
        return [decimals(c) for c in page.get("candles", [])]

    async def ticker(self, market: str, timeout: float = 5.0) -> Dict[str, Any]:
        """Last price, the last 24 hours (open, high, low, volume, change) and the best bid
        and ask."""
        return decimals(await self._query(f"{self._prefix}.query.ticker.{market}", {}, timeout))

    async def _query(self, subject: str, body: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        # The nodes share the subject in a queue group: a stalled node swallows a request, so
        # a query (which changes nothing) is asked again, up to three times.
        for attempt in range(3):
            try:
                msg = await self._nc.request(subject, _pack(body), timeout=timeout + 1.0)
            except nats.errors.NoRespondersError:
                what = "agora history" if (".history" in subject or subject.split(".")[-2] in ("trades", "candles", "ticker")) else "a node"
                raise Timeout(subject, f"nothing answers this query: is {what} running? (a trader may ask only on her own account's subject)") from None
            except nats.errors.TimeoutError:
                if attempt == 2:
                    raise Timeout(subject, "asked three times: is a node running? (agora ctl market.list)") from None
                continue
            reply = _unpack(msg.data)
            if not reply.get("ok"):
                raise QueryRefused(subject, reply.get("error", ""), reply.get("message", ""))
            return reply
        raise Timeout(subject, "no answer")


def _target(cid: Optional[str], oid: Optional[int]) -> Dict[str, Any]:
    if (cid is None) == (oid is None):
        raise ValueError("name the order with cid=... or oid=... (one of them)")
    return {"cid": cid} if cid is not None else {"oid": oid}


class Reports:
    """An account's execution reports, each once, in order (``Client.reports``)."""

    def __init__(self, reader: OrderedReader):
        self._reader = reader
        self._pending: List[Report] = []
        self._started = False

    @property
    def pending_in_message(self) -> int:
        """Reports of the last message not yielded yet."""
        return len(self._pending)

    @property
    def last_stream_seq(self) -> Optional[int]:
        """The ``EXECS`` sequence of the last message read: start a new reader at it + 1."""
        return self._reader.last_stream_seq

    async def start(self) -> None:
        """Creates the consumer now (``next`` and iteration do it when first called)."""
        if not self._started:
            self._started = True
            await self._reader._create()

    async def next(self, timeout: Optional[float] = None) -> Report:
        await self.start()
        while not self._pending:
            msg, sseq = await self._reader.next(timeout)
            body = _unpack(msg.data)
            self._pending = [
                Report(type=r.get("type", ""), fields=decimals(r), stream_seq=sseq) for r in body.get("reports", [])
            ]
        return self._pending.pop(0)

    def __aiter__(self) -> "Reports":
        return self

    async def __anext__(self) -> Report:
        return await self.next()

    async def close(self) -> None:
        await self._reader.close()


class _Feed:
    """A core NATS subscription read one message at a time."""

    def __init__(self, client: Client, subject: str):
        self._client = client
        self._subject = subject
        self._sub = None

    async def start(self) -> None:
        """Subscribes now (iteration does it when first called)."""
        if self._sub is None:
            self._sub = await self._client._nc.subscribe(self._subject)
            await self._client._nc.flush()

    async def _next_msg(self, timeout: Optional[float]):
        await self.start()
        try:
            return await self._sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            raise asyncio.TimeoutError() from None

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


class Tape(_Feed):
    """A market's trades as they happen (``Client.trades``)."""

    def __init__(self, client: Client, market: str):
        super().__init__(client, f"{client._prefix}.trades.{market}")
        self.market = market
        self._last: Optional[int] = None
        self._pending: List[Trade] = []

    async def next(self, timeout: Optional[float] = None) -> Trade:
        while not self._pending:
            msg = await self._next_msg(timeout)
            headers = msg.headers or {}
            seq = int(headers.get("Nats-Sequence", 0))
            before = headers.get("Nats-Last-Sequence")
            if self._last is not None and before is not None and int(before) != self._last:
                missed = (self._last, seq)
                self._last = seq
                raise Timeout(
                    f"{self.market}: trades between stream sequences {missed[0]} and {missed[1]} were missed",
                    "read them from stream TRADES, or go on from here",
                )
            self._last = seq
            body = _unpack(msg.data)
            self._pending = [
                Trade(
                    market=body.get("market", self.market),
                    trade_id=t["trade_id"],
                    price=Decimal(t["price"]),
                    qty=Decimal(t["qty"]),
                    taker_side=t["taker_side"],
                    ts=t.get("ts", 0),
                    stream_seq=seq,
                )
                for t in body.get("trades", [])
            ]
        return self._pending.pop(0)

    def __aiter__(self) -> "Tape":
        return self

    async def __anext__(self) -> Trade:
        return await self.next()


class StatusFeed(_Feed):
    """Markets' status announcements (``Client.status``)."""

    def __init__(self, client: Client, market: str):
        super().__init__(client, f"{client._prefix}.status.{market}")
        self._highest: Dict[str, int] = {}

    async def next(self, timeout: Optional[float] = None) -> MarketStatus:
        while True:
            msg = await self._next_msg(timeout)
            s = _unpack(msg.data)
            name = s.get("market", msg.subject.rsplit(".", 1)[-1])
            epoch = int(s.get("epoch", 0))
            if epoch < self._highest.get(name, 0):
                continue
            self._highest[name] = epoch
            return MarketStatus(market=name, node=s.get("node", ""), epoch=epoch, state=s.get("state", ""), fields=s)

    def __aiter__(self) -> "StatusFeed":
        return self

    async def __anext__(self) -> MarketStatus:
        return await self.next()


class Book:
    """A market's L2 book: ``bids`` and ``asks`` (best first, ``Level(price, qty, orders)``)
    and ``seq``, the input sequence it reflects. Deltas are applied as the protocol says; a
    delta that does not follow the last one applied makes it ask for the snapshot again
    (``resyncs`` counts them)."""

    def __init__(self, client: Client, market: str, depth: int):
        self._client = client
        self.market = market
        self._depth = depth
        self.seq = 0
        self.resyncs = 0
        self._bids: Dict[Decimal, Level] = {}
        self._asks: Dict[Decimal, Level] = {}
        self._sub = None

    @property
    def bids(self) -> List[Level]:
        return sorted(self._bids.values(), key=lambda l: l.price, reverse=True)

    @property
    def asks(self) -> List[Level]:
        return sorted(self._asks.values(), key=lambda l: l.price)

    async def _snapshot(self) -> None:
        subject = f"{self._client._prefix}.book.{self.market}.snapshot"
        while True:
            try:
                msg = await self._client._nc.request(subject, _pack({"depth": self._depth}), timeout=5)
            except nats.errors.NoRespondersError:
                raise UnknownMarket(self.market) from None
            except nats.errors.TimeoutError:
                raise Timeout(subject, "is the market running? (agora ctl market.list)") from None
            body = _unpack(msg.data)
            if "error" in body:
                if body["error"] == "rate_limited":
                    await asyncio.sleep(body.get("retry_after_ms", 100) / 1000.0)
                    continue
                raise QueryRefused(subject, body["error"], body.get("message", ""))
            self.seq = body["seq"]
            self._bids = {Decimal(l["price"]): _level(l) for l in body.get("bids", [])}
            self._asks = {Decimal(l["price"]): _level(l) for l in body.get("asks", [])}
            return

    def _apply(self, delta: Dict[str, Any]) -> None:
        for c in delta.get("changes", []):
            side = self._bids if c["side"] == "buy" else self._asks
            level = _level(c)
            if level.qty == 0:
                side.pop(level.price, None)
            else:
                side[level.price] = level
        self.seq = delta["seq"]

    async def next(self, timeout: Optional[float] = None) -> "Book":
        """The book after its next change (the first call: after the snapshot)."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except asyncio.TimeoutError:
            raise

    def __aiter__(self) -> "Book":
        return self

    async def __anext__(self) -> "Book":
        if self._sub is None:
            # Deltas first, then the snapshot: none can pass by in between.
            self._sub = await self._client._nc.subscribe(f"{self._client._prefix}.book.{self.market}")
            await self._snapshot()
            return self
        while True:
            msg = await self._sub.next_msg(timeout=None)
            delta = _unpack(msg.data)
            if delta["seq"] <= self.seq:
                continue
            if delta["prev_seq"] <= self.seq:
                self._apply(delta)
                return self
            self.resyncs += 1
            await self._snapshot()
            return self

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


def _level(m: Dict[str, Any]) -> Level:
    return Level(price=Decimal(m["price"]), qty=Decimal(m["qty"]), orders=int(m.get("orders", 0)))
