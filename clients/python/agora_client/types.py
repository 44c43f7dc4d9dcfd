"""What the client returns. Prices and quantities are ``decimal.Decimal``, never floats."""

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, List, Optional, Tuple, Union

# Fields that hold a price or a quantity, as decimal strings on the wire.
DECIMAL_FIELDS = frozenset(
    [
        "price",
        "qty",
        "leaves",
        "filled",
        "stop_price",
        "display_qty",
        "last_price",
        "maker_leaves",
        "taker_leaves",
        "avg_price",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "last",
        "open_24h",
        "high_24h",
        "low_24h",
        "volume_24h",
        "change_24h",
        "best_bid",
        "best_ask",
    ]
)

Amount = Union[str, int, Decimal]


def to_wire(name: str, value: Amount) -> str:
    """A price or quantity as the wire wants it: a decimal string. Floats are refused: they
    cannot say 0.1 exactly."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(
            f"{name} {value!r} is a {type(value).__name__}: pass a str or decimal.Decimal "
            "(a float cannot say 0.1 exactly)"
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{name} {value} is not a finite number")
        return format(value, "f")
    if isinstance(value, str):
        try:
            d = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"{name} {value!r} is not a decimal number") from None
        if not d.is_finite():
            raise ValueError(f"{name} {value!r} is not a finite number")
        return value
    raise TypeError(f"{name} must be a str, int or decimal.Decimal, not {type(value).__name__}")


def decimals(record: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a wire map with its prices and quantities as ``Decimal``."""
    out = dict(record)
    for key in DECIMAL_FIELDS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = Decimal(value)
    return out


@dataclass(frozen=True)
class Sent:
    """A command the market's stream stored (not yet applied: its reports say what
    happened). ``oid`` is the order id a ``new`` gets; a batch's commands have ``oids``."""

    market: str
    seq: int
    cid: Optional[str] = None
    oids: Tuple[int, ...] = ()

    @property
    def oid(self) -> int:
        return self.seq * 1000


@dataclass(frozen=True)
class Report:
    """One execution report: ``type`` (accepted, fill, cancelled, amended, triggered,
    rejected), its ``fields`` (prices and quantities as Decimal), and where it is in stream
    ``EXECS`` (``stream_seq``: a reader started at ``stream_seq + 1`` goes on after it)."""

    type: str
    fields: Dict[str, Any]
    stream_seq: int

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def seq(self) -> int:
        return self.fields.get("seq", 0)

    @property
    def cid(self) -> Optional[str]:
        return self.fields.get("cid")


@dataclass(frozen=True)
class Trade:
    """One trade of the public tape."""

    market: str
    trade_id: str
    price: Decimal
    qty: Decimal
    taker_side: str
    ts: int
    stream_seq: int


@dataclass(frozen=True)
class Order:
    """An order as a query shows it: ``status`` is ``open`` (on the book) or ``untriggered``
    (a stop waiting for its trigger) from the books; from the history store also
    ``filled``, ``cancelled``, ``expired`` or ``rejected``, with ``reason`` and
    ``avg_price`` (a rejected order has no side, type or quantity: the rejection did not say
    them)."""

    market: str
    oid: int
    cid: Optional[str]
    account: str
    side: Optional[str]
    order_type: Optional[str]
    tif: Optional[str]
    price: Optional[Decimal]
    stop_price: Optional[Decimal]
    qty: Optional[Decimal]
    display_qty: Optional[Decimal]
    filled: Decimal
    leaves: Decimal
    status: str
    ts: int
    last_seq: int
    avg_price: Optional[Decimal] = None
    reason: Optional[str] = None

    @staticmethod
    def from_wire(m: Dict[str, Any]) -> "Order":
        d = decimals(m)
        return Order(
            market=d["market"],
            oid=d["oid"],
            cid=d.get("cid"),
            account=d["account"],
            side=d.get("side"),
            order_type=d.get("order_type"),
            tif=d.get("tif"),
            price=d.get("price"),
            stop_price=d.get("stop_price"),
            qty=d.get("qty"),
            display_qty=d.get("display_qty"),
            filled=d["filled"],
            leaves=d["leaves"],
            status=d["status"],
            ts=d.get("ts", 0),
            last_seq=d.get("last_seq", 0),
            avg_price=d.get("avg_price"),
            reason=d.get("reason"),
        )


@dataclass
class History:
    """An account's orders (newest first) and fills (each a dict: ``market, trade_id, oid,
    cid, side, liquidity, price, qty, ts, seq``, amounts as ``Decimal``) from the history
    store."""

    orders: List["Order"] = field(default_factory=list)
    fills: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class OpenOrders:
    """An account's open orders: ``as_of`` says which input sequence each market's answer
    reflects; ``missing`` names the markets that did not answer in time (their orders are not
    listed)."""

    orders: List[Order] = field(default_factory=list)
    as_of: Dict[str, int] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class MarketStatus:
    """Who runs a market and in which state (``active``, ``released``, ``stopped``,
    ``failed``...), at which epoch. Clients never need to redirect: orders go to the market's
    stream whoever runs it."""

    market: str
    node: str
    epoch: int
    state: str
    fields: Dict[str, Any]


@dataclass(frozen=True)
class Level:
    price: Decimal
    qty: Decimal
    orders: int
