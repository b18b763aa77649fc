"""Storage: one interface (``Store``), an in-memory and a Redis implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from aleatoria.config import Config
from aleatoria.store.base import Health, Store
from aleatoria.store.memory import MemoryStore

__all__ = ["Health", "MemoryStore", "Store", "open_store"]

_PURGE_EVERY = 60.0


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[Store]:
    """The store the configuration asks for, with its background tasks running: Redis when
    ``config.effective_redis_url`` is set (started even if Redis is unreachable: it then
    serves from memory, degraded, and keeps retrying), else the in-memory store. On exit,
    pending writes are flushed (bounded by the store's own timeouts)."""
    url = config.effective_redis_url
    if url:
        # Imported here: the memory path never loads redis-py.
        from aleatoria.store.redis import open_redis_store

        async with open_redis_store(config, url) as store:
            yield store
        return
    memory = MemoryStore(
        ttl_seconds=config.message_ttl_seconds,
        history_max=config.history_max,
        budget_bytes=config.history_memory_bytes,
        search_rules=config.search_rules,
        search_clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_purge_forever, memory)
        try:
            yield memory
        finally:
            nursery.cancel_scope.cancel()


async def _purge_forever(memory: MemoryStore) -> None:
    # Trim-on-write keeps busy histories bounded; this sweeps the idle ones.
    while True:
        await trio.sleep(_PURGE_EVERY)
        memory.purge_expired()
        memory.search_queue.forget_cooldowns()
