"""Encryption at rest: token records sealed with AES-256-GCM before a store writes them.

Envelope style. A :class:`KeyRing` holds named 256-bit data keys; the newest
seals every new write, every key in the ring opens what it sealed. A sealed
record keeps its bookkeeping fields (status, generation, expiry, intent) in the
clear, because the stores' atomic steps read or rewrite them (Postgres's acquire
merges ``status`` and ``intent`` on the server); only the secrets, the access
and refresh tokens, go into the ciphertext::

    {"status": "valid", ..., "sealed": "v1.<key id>.<base64 nonce + ciphertext>"}

The associated data binds the ciphertext to the store's namespace, the
customer, the key id and the instance URL the tokens are for: a record copied
under another customer (or namespace), or pointed at another instance, does not
open. A record with no ``sealed`` field (written before sealing was turned on)
is read as it is and sealed by the next write (or by :func:`rekey`).

Sealing and opening are synchronous and cost microseconds; they happen only
where a store writes or reads a record, never on the token manager's hot path
(which reads its own decrypted cache). A key that comes from a KMS is unwrapped
once, when the store starts (:meth:`Sealer.ready`), and kept in memory.

Errors are :class:`SealingError` (a :class:`~sfrtr.StoreError`): a record
that does not open is never treated as absent, so nothing is overwritten
because of it, and a token manager keeps a rotated token it could not seal
in memory and retries, as for any store failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from sfrtr.errors import ConfigurationError, StoreError
from sfrtr.records import Status, TokenRecord

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sfrtr.store.base import TokenStore

__all__ = ["ENV_VAR", "KeyRing", "RekeyReport", "Sealer", "SealingError", "rekey"]

ENV_VAR = "SFRTR_KEYS"
"""The default environment variable of :meth:`KeyRing.from_env`."""

_VERSION = "v1"
_SECRET_FIELDS = ("access_token", "refresh_token")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_NONCE = 12

KeyMaterial = Mapping[str, bytes] | Sequence[tuple[str, bytes]]


class SealingError(StoreError):
    """A record cannot be sealed or opened: a missing or wrong key, a record copied
    from elsewhere or tampered with, or a key ring that is misconfigured. Never
    carries a key or a token."""


def new_key() -> str:
    """A fresh 256-bit key, base64 (what :meth:`KeyRing.from_env` reads)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


class KeyRing:
    """Named AES-256 keys; the last one given (or ``current``) seals new writes.

    ``keys``: ``{key_id: 32 raw bytes}`` or ``[(key_id, bytes), ...]``, oldest
    first. Keys are never shown by ``repr``."""

    def __init__(self, keys: KeyMaterial, *, current: str | None = None) -> None:
        # Imported here: stores import this module, sealing is optional (the
        # ``encryption`` extra), and a store without a sealer never needs it.
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise ConfigurationError(
                "sealing needs the cryptography package: pip install 'sfrtr[encryption]'"
            ) from None
        items = list(keys.items()) if isinstance(keys, Mapping) else list(keys)
        if not items:
            raise SealingError("the key ring is empty: give at least one key")
        self._keys: dict[str, AESGCM] = {}
        for n, (key_id, raw) in enumerate(items, 1):
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                # Not quoted: an entry written backwards makes the key its id.
                raise SealingError(f"key {n} of the ring: its id is not 1-40 letters, "
                                   "digits, - or _ (is the entry written id:key?)")
            if key_id in self._keys:
                raise SealingError(f"key id {key_id!r} appears twice in the key ring")
            if not isinstance(raw, bytes | bytearray) or len(raw) != 32:
                raise SealingError(f"key {key_id!r} is not 32 bytes (AES-256 needs 32)")
            self._keys[key_id] = AESGCM(bytes(raw))
        self.current = current if current is not None else items[-1][0]
        if self.current not in self._keys:
            raise SealingError(f"current key {self.current!r} is not in the key ring")

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids!r}, current={self.current!r})"

    @property
    def ids(self) -> list[str]:
        """The key ids, in the order given."""
        return list(self._keys)

    def cipher(self, key_id: str) -> AESGCM | None:
        return self._keys.get(key_id)

    @classmethod
    def parse(cls, text: str, *, source: str = "key text") -> KeyRing:
        """Keys as ``id:base64`` entries separated by commas or new lines (``#``
        starts a comment), oldest first: the last entry seals new writes, unless an
        entry ``current=<id>`` names another (a rotation's first phase: every worker
        learns the new key before any writes with it)."""
        items: list[tuple[str, bytes]] = []
        current: str | None = None
        for n, line in enumerate(re.split(r"[,\n]", text), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            if entry.startswith("current="):
                current = entry.partition("=")[2].strip()
                continue
            key_id, sep, encoded = entry.partition(":")
            key_id = key_id.strip()
            # Entries are named by position: an id that fails validation may be the key.
            if not sep or not _KEY_ID.fullmatch(key_id):
                raise SealingError(f"{source}: entry {n} is not id:base64-key (an id of "
                                   "1-40 letters, digits, - or _, then the key)")
            try:
                raw = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise SealingError(f"{source}: the key of entry {n} ({key_id!r}) is not "
                                   "base64") from None
            items.append((key_id, raw))
        if not items:
            raise SealingError(f"{source}: no keys")
        return cls(items, current=current)

    @classmethod
    def from_env(cls, name: str = ENV_VAR) -> KeyRing:
        """Keys from the environment variable ``name`` (see :meth:`parse`)."""
        text = os.environ.get(name)
        if not text:
            raise SealingError(f"no keys: the environment variable {name} is not set "
                               "(format: id:base64-key[,id:base64-key...], newest last)")
        return cls.parse(text, source=f"${name}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Keys from a file, one ``id:base64`` per line, newest last."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise SealingError(f"cannot read the key file {os.fspath(path)!r}: "
                               f"{exc.strerror or type(exc).__name__}") from None
        return cls.parse(text, source=os.fspath(path))

    @classmethod
    async def from_kms(cls, unwrap: Callable[[], Awaitable[KeyMaterial]]) -> KeyRing:
        """Keys from ``await unwrap()``: e.g. data keys decrypted by a KMS."""
        return cls(await unwrap())


class Sealer:
    """Seals and opens token records with a key ring.

    ``keys``: a :class:`KeyRing`, or an async callable returning one (a KMS
    unwrap), called once by :meth:`ready` (stores call it when they start).
    ``accept_plain``: read records written before sealing was turned on (sealed by
    their next write); once every record is sealed (:func:`rekey`), ``False``
    refuses an unsealed record, which only someone writing to the store behind
    the workers' back could have put there."""

    def __init__(self, keys: KeyRing | Callable[[], Awaitable[KeyRing]], *,
                 accept_plain: bool = True, unwrap_timeout: float = 30.0) -> None:
        self.accept_plain = accept_plain
        self.unwrap_timeout = unwrap_timeout
        self._ring: KeyRing | None = keys if isinstance(keys, KeyRing) else None
        self._unwrap = None if isinstance(keys, KeyRing) else keys
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Sealer({self._ring!r})"

    async def ready(self) -> None:
        """Unwrap the keys if they come from a callable (once)."""
        if self._ring is not None:
            return
        async with self._lock:
            if self._ring is None and self._unwrap is not None:
                try:
                    async with asyncio.timeout(self.unwrap_timeout):
                        ring = await self._unwrap()
                except SealingError:
                    raise
                except TimeoutError:
                    raise SealingError(f"the key callable (KMS) did not answer within "
                                       f"{self.unwrap_timeout:g}s") from None
                except Exception as exc:
                    # Its message is not repeated: a KMS error may quote key material.
                    raise SealingError(f"the key callable (KMS) failed: "
                                       f"{type(exc).__name__}") from None
                if not isinstance(ring, KeyRing):
                    raise SealingError("the key callable must return a KeyRing")
                self._ring = ring

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            raise SealingError("the key ring is not unwrapped yet (the store has not started)")
        return self._ring

    @staticmethod
    def _aad(namespace: str, customer: str, key_id: str, data: dict[str, Any]) -> bytes:
        parts = [b"sfrtr-seal-v1", namespace.encode(), customer.encode(), key_id.encode(),
                 str(data.get("instance_url")).encode()]
        # Where the tokens are sent (the grant's login host and app) is bound too, but
        # only when recorded: records sealed before grants remembered them still open,
        # and adding, changing or dropping either field makes the record not open.
        for name in ("token_host", "client_id"):
            if data.get(name):
                parts.append(f"{name}={data[name]}".encode())
        return b"\0".join(parts)

    def seal(self, namespace: str, customer: str, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` (a record's dict) with its tokens replaced by a ``sealed`` field."""
        ring = self.ring
        key_id = ring.current
        cipher = ring.cipher(key_id)
        assert cipher is not None
        plain = orjson.dumps([data[name] for name in _SECRET_FIELDS])
        nonce = secrets.token_bytes(_NONCE)
        box = cipher.encrypt(nonce, plain,
                             self._aad(namespace, customer, key_id, data))
        out = {k: v for k, v in data.items() if k not in _SECRET_FIELDS}
        out["sealed"] = f"{_VERSION}.{key_id}.{base64.b64encode(nonce + box).decode()}"
        return out

    def open(self, namespace: str, customer: str, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with its tokens back (a record written unsealed is returned as is)."""
        sealed = data.get("sealed")
        if sealed is None:
            if not self.accept_plain:
                raise SealingError(f"the record of customer {customer!r} is not sealed, and "
                                   "this store reads sealed records only (accept_plain=False)")
            return data
        key_id, blob = _parse_sealed(customer, sealed)
        from cryptography.exceptions import InvalidTag

        cipher = self.ring.cipher(key_id)
        if cipher is None:
            raise SealingError(
                f"the record of customer {customer!r} is sealed with key {key_id!r}, which "
                f"is not in the key ring (ids {self.ring.ids}): add that key back")
        try:
            plain = cipher.decrypt(blob[:_NONCE], blob[_NONCE:],
                                   self._aad(namespace, customer, key_id, data))
            tokens = orjson.loads(plain)
        except (InvalidTag, orjson.JSONDecodeError, ValueError):
            raise SealingError(
                f"the record of customer {customer!r} does not open with key {key_id!r}: a "
                "wrong key under that id, or a record copied from another customer or "
                "namespace, or altered") from None
        out = {k: v for k, v in data.items() if k != "sealed"}
        out.update(zip(_SECRET_FIELDS, tokens, strict=True))
        return out

    @staticmethod
    def key_id_of(data: Mapping[str, Any]) -> str | None:
        """The id of the key that sealed ``data`` (``None``: not sealed)."""
        sealed = data.get("sealed")
        return None if sealed is None else _parse_sealed("?", sealed)[0]


def _parse_sealed(customer: str, sealed: Any) -> tuple[str, bytes]:
    try:
        version, key_id, encoded = str(sealed).split(".")
        if version != _VERSION:
            raise ValueError(version)
        return key_id, base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise SealingError(f"the sealed record of customer {customer!r} is malformed") from None


def encode(sealer: Sealer | None, namespace: str, customer: str,
           record: TokenRecord) -> dict[str, Any]:
    """A record as the dict a store writes: sealed when the store has a sealer."""
    data = record.to_dict()
    return data if sealer is None else sealer.seal(namespace, customer, data)


def decode(sealer: Sealer | None, namespace: str, customer: str, data: Any) -> TokenRecord:
    """A record from the dict a store read (:class:`SealingError` if it does not open)."""
    if sealer is not None and isinstance(data, dict):
        data = sealer.open(namespace, customer, data)  # plain records: accept_plain
    elif isinstance(data, dict) and "sealed" in data and sealer is None:
        key_id = Sealer.key_id_of(data)
        raise SealingError(
            f"the record of customer {customer!r} is sealed (key {key_id!r}) and this "
            "store has no key ring: pass sealer=Sealer(KeyRing...)")
    return TokenRecord.from_dict(data)


@dataclass
class RekeyReport:
    """What :func:`rekey` did."""

    resealed: int = 0
    """Records written again (sealed with the newest key)."""
    rescues: int = 0
    """Rescue entries written again."""
    busy: list[str] | None = None
    """Customers left as they were: a refresh held them all along (its commit seals
    with the newest key anyway); run again later."""


async def rekey(store: TokenStore, *, customers: Iterable[str] | None = None,
                attempts: int = 5, busy_wait: float = 2.0) -> RekeyReport:
    """Re-seal every record of ``store`` with the newest key of its sealer.

    Each record is written back with a compare on its version (a commit at the
    version just read), never with an unconditional put: a refresh that moved
    first wins, and the record is read again. A record held by a refresh is
    waited for (``busy_wait`` seconds, ``attempts`` times), then reported busy.
    Rescue entries are written again as they are, those of customers without a
    record included (every store lists them). Records that do not open
    raise :class:`SealingError` and nothing is written for them. Then a store
    that can (``scrub()``: SQLite, Postgres) drops the replaced versions from
    its files; etcd keeps them in its history until it is compacted and
    defragmented (an operator's step, ``docs/security.md``).
    """
    if getattr(store, "sealer", None) is None:
        raise SealingError("this store has no sealer: rekey would write its records in the "
                           "clear; build it with sealer=Sealer(KeyRing...)")
    report = RekeyReport(busy=[])
    assert report.busy is not None
    if customers is not None:
        names = list(customers)
    else:
        names = await store.customers()
        rescued = getattr(store, "rescued_customers", None)
        if rescued is not None:  # rescues under no record: a disconnect fenced them out
            known = set(names)
            names += [c for c in await rescued() if c not in known]
    for customer in names:
        done = False
        for _ in range(attempts):
            state = await store.read(customer)
            if state is None:
                done = True
                break
            if state.locked or state.record.status is Status.REFRESHING:
                await store.wait_for_change(customer, state.stamp, busy_wait)
                continue
            if await store.commit(customer, state.version, state.record) is not None:
                report.resealed += 1
                done = True
                break
        if not done:
            report.busy.append(customer)
            continue
        reseal = getattr(store, "reseal_rescue", None)
        for fence, rescued in await store.rescues(customer):
            # Only if it still exists: an entry adopted, dropped or disconnected since
            # the read must not come back (a store without reseal_rescue: save it).
            if reseal is not None:
                if await reseal(customer, fence, rescued):
                    report.rescues += 1
            else:
                await store.save_rescue(customer, fence, rescued)
                report.rescues += 1
    scrub = getattr(store, "scrub", None)
    if scrub is not None:
        await scrub()
    return report
