"""The exact result cache: final encoded images by a key over everything that changes them
(cache_key.py); identical requests with a seed are served the stored ``Result`` (the very
bytes a fresh generation returns) without reaching the engine.

The cache lives at the API edge because its entries are encoded images: the engine never
knows. Tiers, looked up in order, each optional: process memory (an LRU bounded in bytes),
a directory (one file per key, written atomically, survives restarts) and Redis (shared by
replicas). A hit in a lower tier fills the ones above it. An entry is the serialized
``Result`` framed with a checksum: a corrupt or partial entry in any tier is never served, it
is counted, dropped and rewritten by the next generation. A store that fails (disk full, Redis
gone) is logged, counted and skipped; a request never fails because its cache did.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..engine.types import GenerationParams
from .cache_key import InputDigests, ModelFingerprint, result_key

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

# -- entries ------------------------------------------------------------------------------
# An entry on disk or in Redis: magic, sha256 of the payload, payload (a serialized Result).
_MAGIC = b"stepserve-result-v1\n"
_DIGEST = 32


def frame(payload: bytes) -> bytes:
    """``payload`` framed for a store: magic, its sha256, itself."""
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def unframe(blob: bytes) -> bytes | None:
    """The payload of a framed entry, or None when it is not a whole, intact one."""
    head = len(_MAGIC) + _DIGEST
    if len(blob) < head or not blob.startswith(_MAGIC):
        return None
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(_MAGIC) : head]:
        return None
    return payload


class CacheMetrics(Protocol):
    """What the cache reports (observability/metrics.py implements it)."""

    def cache_error(self, store: str, kind: str) -> None: ...
    def cache_evicted(self, store: str, n: int) -> None: ...
    def cache_bytes(self, store: str, n: int) -> None: ...


class StoreError(Exception):
    """A store failed (its cause chained); the caller logs and counts it, then carries on."""


class Store(Protocol):
    """One tier. ``get`` returns a framed entry or None; both raise StoreError on failure."""

    name: str

    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, blob: bytes) -> None: ...
    async def delete(self, key: str) -> None: ...


class MemoryStore:
    """An LRU of entries bounded by their total bytes (payloads; keys and dict overhead are
    small beside images). An entry larger than the whole bound is not kept."""

    name = "memory"

    def __init__(self, max_bytes: int, metrics: CacheMetrics) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> bytes | None:
        blob = self._entries.get(key)
        if blob is not None:
            self._entries.move_to_end(key)
        return blob

    async def put(self, key: str, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[key] = blob
        self.bytes += len(blob)
        evicted = 0
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= len(dropped)
            evicted += 1
        if evicted:
            self.metrics.cache_evicted(self.name, evicted)
        self.metrics.cache_bytes(self.name, self.bytes)

    async def delete(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
            self.metrics.cache_bytes(self.name, self.bytes)

    def __len__(self) -> int:
        return len(self._entries)


class DiskStore:
    """One file per key under ``root/<first 2 hex>/<key>``, written to a temporary file in the
    same directory and renamed over the old one (atomic on POSIX: a reader sees the old entry
    or the new, never half of one; a crash leaves at most a stray ``.tmp`` file). File work runs
    in a thread.

    Bounded by ``max_bytes`` (0: unbounded): a hit touches its file's mtime, and when the
    entries outgrow the bound the least recently used files go until they fill 90% of it (one
    directory scan per pruning, not per write). The total is counted from a scan at the first
    write, so entries left by an earlier run count too."""

    name = "disk"
    # Pruning stops below this share of the bound, so a full cache does not scan on every write.
    PRUNE_TO = 0.9

    def __init__(self, root: Path, max_bytes: int = 0, metrics: CacheMetrics | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._bytes: int | None = None  # unknown until the first write scans

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    async def get(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._read, self.path(key))
        except OSError as e:
            raise StoreError(f"reading {self.path(key)}: {e}") from e

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be pruned
        return blob

    async def put(self, key: str, blob: bytes) -> None:
        try:
            await asyncio.to_thread(self._write, self.path(key), blob)
        except OSError as e:
            raise StoreError(f"writing {self.path(key)}: {e}") from e

    def _write(self, path: Path, blob: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = path.stat().st_size
        except FileNotFoundError:
            old = 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.max_bytes:
            with self._lock:
                if self._bytes is None:
                    self._bytes = sum(size for _, size, _ in self._entries())
                else:
                    self._bytes += len(blob) - old
                if self._bytes > self.max_bytes:
                    self._prune()

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry file."""
        out = []
        for p in self.root.glob("??/*"):
            if p.suffix == ".tmp":
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((st.st_mtime, st.st_size, p))
        return out

    def _prune(self) -> None:
        """Drop least recently used entries until they fill PRUNE_TO of the bound (lock held)."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        dropped = 0
        for _, size, p in entries:
            if total <= self.PRUNE_TO * self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                total -= size
                dropped += 1
        self._bytes = total
        if dropped and self.metrics is not None:
            self.metrics.cache_evicted(self.name, dropped)

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self.path(key).unlink, True)
        except OSError as e:
            raise StoreError(f"removing {self.path(key)}: {e}") from e


class RedisStore:
    """Entries in Redis under ``stepserve:result:<key>`` with a TTL, through redis-py's asyncio
    client with short timeouts: a Redis that is slow or gone costs a request at most about
    ``timeout_s`` once, then is skipped for ``retry_after_s`` (so an outage does not add a
    timeout to every request)."""

    name = "redis"
    PREFIX = "stepserve:result:"

    def __init__(self, url: str, ttl_s: int, timeout_s: float = 0.5, retry_after_s: float = 2.0) -> None:
        from redis.asyncio import Redis

        self.url = url
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self.client: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._down_until = 0.0

    def available(self) -> bool:
        """False while skipped after a failure."""
        return time.monotonic() >= self._down_until

    async def _call(self, what: str, op: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await op()
        except (RedisError, OSError) as e:
            self._down_until = time.monotonic() + self.retry_after_s
            raise StoreError(f"redis {what}: {type(e).__name__}: {e}") from e

    async def get(self, key: str) -> bytes | None:
        value = await self._call("GET", lambda: self.client.get(self.PREFIX + key))
        return None if value is None else bytes(value)

    async def put(self, key: str, blob: bytes) -> None:
        await self._call("SET", lambda: self.client.set(self.PREFIX + key, blob, ex=self.ttl_s or None))

    async def delete(self, key: str) -> None:
        await self._call("DEL", lambda: self.client.delete(self.PREFIX + key))

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True)
class Hit:
    """A cache hit: the stored Result's bytes and the tier that had them."""

    payload: bytes
    store: str


class ResultCache:
    """The tiers in lookup order (memory, disk, Redis), with the rules shared by all of them:
    entries are checked before they are served, failures are logged (at most once per
    ``log_every_s`` per store) and counted, never raised."""

    def __init__(
        self,
        stores: list[Store],
        metrics: CacheMetrics,
        fingerprints: Mapping[str, ModelFingerprint],
        log_every_s: float = 30.0,
    ) -> None:
        self.stores = stores
        self.metrics = metrics
        self.fingerprints = dict(fingerprints)
        self.log_every_s = log_every_s
        self._logged: dict[str, float] = {}

    def key(self, params: GenerationParams, inputs: InputDigests) -> str:
        return result_key(params, self.fingerprints[params.model], inputs)

    async def get(self, key: str) -> Hit | None:
        """The entry from the first tier that has an intact one; the tiers above it are filled."""
        for i, store in enumerate(self.stores):
            if isinstance(store, RedisStore) and not store.available():
                continue
            try:
                blob = await store.get(key)
            except StoreError as e:
                self._failed(store.name, e)
                continue
            if blob is None:
                continue
            payload = unframe(blob)
            if payload is None:
                self._corrupt(store, key, len(blob))
                with contextlib.suppress(StoreError):
                    await store.delete(key)
                continue
            for upper in self.stores[:i]:
                await self._put(upper, key, blob)
            return Hit(payload, store.name)
        return None

    async def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` in every tier (the lower ones concurrently)."""
        blob = frame(payload)
        await asyncio.gather(*(self._put(store, key, blob) for store in self.stores))

    async def _put(self, store: Store, key: str, blob: bytes) -> None:
        if isinstance(store, RedisStore) and not store.available():
            return
        try:
            await store.put(key, blob)
        except StoreError as e:
            self._failed(store.name, e)

    def _corrupt(self, store: Store, key: str, size: int) -> None:
        self.metrics.cache_error(store.name, "corrupt")
        logger.warning(
            "result cache: %s entry %s is corrupt or partial (%d bytes); ignored, to be rewritten",
            store.name,
            key,
            size,
        )

    def _failed(self, store: str, error: StoreError) -> None:
        self.metrics.cache_error(store, "unavailable")
        now = time.monotonic()
        if now - self._logged.get(store, -self.log_every_s) >= self.log_every_s:
            self._logged[store] = now
            logger.warning(
                "result cache: %s failed (%s); generating without it (logged at most every %.0fs)",
                store,
                error,
                self.log_every_s,
            )

    async def close(self) -> None:
        for store in self.stores:
            if isinstance(store, RedisStore):
                with contextlib.suppress(Exception):
                    await store.close()


def build_stores(
    memory_bytes: int,
    directory: str,
    directory_bytes: int,
    redis_url: str,
    redis_ttl_s: int,
    metrics: CacheMetrics,
) -> list[Store]:
    """The configured tiers, in lookup order."""
    stores: list[Store] = []
    if memory_bytes > 0:
        stores.append(MemoryStore(memory_bytes, metrics))
    if directory:
        stores.append(DiskStore(Path(directory), directory_bytes, metrics))
    if redis_url:
        stores.append(RedisStore(redis_url, redis_ttl_s))
    return stores


__all__ = ["Hit", "ResultCache", "Store", "StoreError", "build_stores", "frame", "unframe"]
