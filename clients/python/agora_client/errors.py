"""Errors the client raises: each says what went wrong and what to do."""


class AgoraError(Exception):
    """Every error of this package."""


class UnknownMarket(AgoraError):
    """No market stream takes orders on this subject: the market does not exist (or was
    removed). List the markets with ``agora ctl market.list``."""

    def __init__(self, market: str):
        super().__init__(
            f"{market} does not take orders here: no stream answers; list markets with `agora ctl market.list`"
        )
        self.market = market


class NotAcknowledged(AgoraError):
    """JetStream did not acknowledge a publish in time: the command may or may not be stored.
    Send it again with the same ``cid``: the market refuses the second copy ``duplicate_cid``,
    so it counts once."""

    def __init__(self, subject: str, reason: str):
        super().__init__(
            f"no acknowledgement on {subject} ({reason}): the command may or may not be stored; "
            "send it again with the same cid: it counts once"
        )
        self.subject = subject
        self.reason = reason


class OrderRejected(AgoraError):
    """The market refused the command: ``reason`` is machine-readable (``price_not_on_tick``,
    ``rate_limited``...), ``message`` says what to fix, ``report`` is the whole report;
    ``retry_after`` (seconds) is set for ``rate_limited``."""

    def __init__(self, report: dict):
        self.report = report
        self.reason = report.get("reason", "")
        self.message = report.get("message", "")
        ms = report.get("retry_after_ms")
        self.retry_after = None if ms is None else ms / 1000.0
        super().__init__(f"{report.get('market', '?')}: rejected {self.reason}: {self.message}")


class QueryRefused(AgoraError):
    """A query was refused: ``error`` is machine-readable (``bad_request``, ``unknown_market``,
    ``unavailable``), ``message`` says why."""

    def __init__(self, subject: str, error: str, message: str):
        super().__init__(f"{subject} refused the query ({error}): {message}")
        self.subject = subject
        self.error = error
        self.message = message


class Timeout(AgoraError):
    """Nothing answered in time; ``hint`` says what to check."""

    def __init__(self, what: str, hint: str):
        super().__init__(f"{what}: {hint}")
        self.hint = hint
