"""agora-client: trade on an Agora matching runtime over NATS.

    import agora_client
    client = await agora_client.connect("nats://127.0.0.1:4222", account="alice")
    await client.place("BTC-USDC", "buy", "0.5", "65000.00", cid="a1", wait=5)

See clients/python/README.md, and docs/clients.md for what a client can rely on.
"""

from ._client import Book, Client, Reports, StatusFeed, Tape, connect
from .errors import AgoraError, NotAcknowledged, OrderRejected, QueryRefused, Timeout, UnknownMarket
from .types import History, Level, MarketStatus, OpenOrders, Order, Report, Sent, Trade

__all__ = [
    "AgoraError",
    "Book",
    "Client",
    "History",
    "Level",
    "MarketStatus",
    "NotAcknowledged",
    "OpenOrders",
    "Order",
    "OrderRejected",
    "QueryRefused",
    "Report",
    "Reports",
    "Sent",
    "StatusFeed",
    "Tape",
    "Timeout",
    "Trade",
    "UnknownMarket",
    "connect",
]
