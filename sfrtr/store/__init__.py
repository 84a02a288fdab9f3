"""Token stores: where records live and how workers take turns refreshing."""

from sfrtr.store.base import OnceStore, TokenStore
from sfrtr.store.memory import MemoryStore
from sfrtr.store.sqlite import SqliteStore

__all__ = ["MemoryStore", "OnceStore", "SqliteStore", "TokenStore"]
