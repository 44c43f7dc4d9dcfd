"""An ordered reader of a stream: every stored message of a subject once, in order, from a
starting point, going on by itself after a lost connection or a consumer that vanished.

It is a push consumer with flow control and idle heartbeats, created by name with its filter in
the request subject (``$JS.API.CONSUMER.CREATE.<STREAM>.<NAME>.<FILTER>``), the one form the
reference NATS permissions allow a trader on ``EXECS``. Each delivery carries its consumer
sequence: a jump (messages lost while disconnected), a heartbeat that says more was sent than
arrived, or silence for three heartbeats makes a new consumer from the stream sequence after
the last message yielded. Nothing is acknowledged and nothing is yielded twice.
"""

import asyncio
import json
import secrets
from datetime import datetime, timezone
from typing import Optional, Tuple, Union

import nats
from nats.aio.msg import Msg

HEARTBEAT_S = 2.0

Start = Union[str, int, datetime]


class OrderedReader:
    def __init__(self, nc, stream: str, filter_subject: str, start: Start, inbox_prefix: str):
        self._nc = nc
        self._stream = stream
        self._filter = filter_subject
        self._start = start
        self._inbox = inbox_prefix
        self._sub = None
        self._name: Optional[str] = None
        self._cseq = 0
        self._last_sseq: Optional[int] = None
        self._closed = False

    @property
    def last_stream_seq(self) -> Optional[int]:
        """The stream sequence of the last message yielded (None before the first)."""
        return self._last_sseq

    def _policy(self) -> dict:
        if self._last_sseq is not None:
            return {"deliver_policy": "by_start_sequence", "opt_start_seq": self._last_sseq + 1}
        start = self._start
        if start == "now":
            return {"deliver_policy": "new"}
        if start == "all":
            return {"deliver_policy": "all"}
        if isinstance(start, int) and not isinstance(start, bool):
            if start < 1:
                raise ValueError(f"a stream sequence starts at 1, not {start}")
            return {"deliver_policy": "by_start_sequence", "opt_start_seq": start}
        if isinstance(start, datetime):
            when = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
            return {
                "deliver_policy": "by_start_time",
                "opt_start_time": when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            }
        raise ValueError(f"since must be 'now', 'all', a stream sequence or a datetime, not {start!r}")

    async def _create(self) -> None:
        name = "agora_" + secrets.token_hex(8)
        deliver = f"{self._inbox}.{secrets.token_hex(10)}"
        sub = await self._nc.subscribe(deliver)
        config = {
            "name": name,
            "deliver_subject": deliver,
            "filter_subject": self._filter,
            "ack_policy": "none",
            "max_deliver": 1,
            "flow_control": True,
            "idle_heartbeat": int(HEARTBEAT_S * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(60e9),
            **self._policy(),
        }
        request = json.dumps({"stream_name": self._stream, "config": config}).encode()
        subject = f"$JS.API.CONSUMER.CREATE.{self._stream}.{name}.{self._filter}"
        try:
            reply = await self._nc.request(subject, request, timeout=5)
            info = json.loads(reply.data)
        except Exception:
            await sub.unsubscribe()
            raise
        if "error" in info:
            await sub.unsubscribe()
            e = info["error"]
            raise RuntimeError(f"cannot read {self._stream} ({self._filter}): {e.get('description', e)}")
        old_sub, old_name = self._sub, self._name
        self._sub, self._name, self._cseq = sub, name, 0
        if self._last_sseq is None and self._start == "now":
            # Where "new" began, so that a reader reset before its first message goes on from
            # there rather than from whatever is new by then.
            self._last_sseq = info.get("delivered", {}).get("stream_seq", 0)
        if old_sub is not None:
            try:
                await old_sub.unsubscribe()
            except Exception:
                pass
        if old_name is not None:
            try:
                await self._nc.request(f"$JS.API.CONSUMER.DELETE.{self._stream}.{old_name}", b"", timeout=2)
            except Exception:
                pass

    async def _reset(self) -> None:
        """A new consumer from after the last message yielded, retried until NATS answers."""
        wait = 0.1
        while not self._closed:
            try:
                await self._create()
                return
            except Exception:
                await asyncio.sleep(wait)
                wait = min(wait * 2, 2.0)

    async def next(self, timeout: Optional[float] = None) -> Tuple[Msg, int]:
        """The next message and its stream sequence; ``asyncio.TimeoutError`` after
        ``timeout`` seconds without one."""
        if self._sub is None:
            await self._create()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise RuntimeError("the reader is closed")
            wait = HEARTBEAT_S * 3
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError()
                wait = min(wait, left)
            try:
                msg = await self._sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise asyncio.TimeoutError() from None
                # Three heartbeats missed: the consumer or the connection is gone.
                await self._reset()
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                await self._reset()
                continue
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is not None:
                if status == "100" and msg.reply:
                    # Flow control: answer, or the server stops sending.
                    await self._nc.publish(msg.reply, b"")
                    continue
                stalled = headers.get("Nats-Consumer-Stalled")
                if stalled:
                    await self._nc.publish(stalled, b"")
                last = headers.get("Nats-Last-Consumer")
                if last is not None and int(last) > self._cseq:
                    # More was sent than arrived.
                    await self._reset()
                continue
            try:
                meta = msg.metadata
            except Exception:
                continue
            if meta.sequence.consumer != self._cseq + 1:
                await self._reset()
                continue
            self._cseq = meta.sequence.consumer
            self._last_sseq = meta.sequence.stream
            return msg, meta.sequence.stream

    async def close(self) -> None:
        self._closed = True
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
        if self._name is not None and self._nc.is_connected:
            try:
                await self._nc.request(f"$JS.API.CONSUMER.DELETE.{self._stream}.{self._name}", b"", timeout=2)
            except Exception:
                pass
