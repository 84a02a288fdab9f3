"""A string that refuses to show itself: tokens travel wrapped in :class:`Secret`."""

from __future__ import annotations

import hashlib
import hmac


def fingerprint(value: str) -> str:
    """A short, stable, non-reversible name for a secret (12 hex chars of SHA-256)."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


class Secret:
    """A token value whose ``repr``/``str`` show only a fingerprint.

    Call :meth:`reveal` at the one place the value must go on the wire.
    Equality is by value, in constant time.
    """

    __slots__ = ("_fingerprint", "_value")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise TypeError("a Secret wraps a non-empty str")
        self._value = value
        self._fingerprint: str | None = None

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._value)
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Secret(sha256:{self.fingerprint})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would be the quiet way to copy a token into a log or queue.
        raise TypeError("Secret values are not picklable")
