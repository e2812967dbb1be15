"""Envelope encryption: a data key per delegation (or agent), wrapped by KMS; blobs in AES-GCM.

The encryption context (KMS side) and the AEAD associated data (blob side) both bind a blob to
its owner, so a blob copied onto another row or a flipped byte fails to open. Unwrapped data
keys are cached in memory only, bounded in count and age, like the AWS Encryption SDK's
caching materials manager; they never reach disk or Redis.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from delegation.errors import KeyDestroyed, SealedDataInvalid
from delegation.kms import Context, KeyProvider, canonical

BLOB_VERSION = b"\x01"


@dataclass(frozen=True, repr=False)
class Sealed:
    """What is stored: ciphertext, the wrapped data key, and the KMS key that wraps it."""

    blob: bytes
    wrapped_key: bytes
    key_id: str

    def __repr__(self) -> str:
        return f"Sealed(key_id={self.key_id!r}, {len(self.blob)} bytes)"


def delegation_context(user_id: object, delegation_id: object, agent_id: object) -> Context:
    return {
        "purpose": "delegation-tokens",
        "user": str(user_id),
        "delegation": str(delegation_id),
        "agent": str(agent_id),
    }


def agent_context(agent_id: object) -> Context:
    return {"purpose": "agent-credential", "agent": str(agent_id)}


class DataKeyCache:
    """LRU of unwrapped data keys, bounded by count and by age (monotonic seconds)."""

    def __init__(self, *, max_entries: int, max_age: float, monotonic: Callable[[], float]):
        self._max_entries = max_entries
        self._max_age = max_age
        self._monotonic = monotonic
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(wrapped: bytes, key_id: str, context: Context) -> bytes:
        return hashlib.sha256(key_id.encode() + b"\0" + canonical(context) + b"\0" + wrapped)\
            .digest()

    def get(self, cache_key: bytes) -> bytes | None:
        with self._lock:
            entry = self._entries.get(cache_key)
            if entry is None:
                return None
            born, plaintext = entry
            if self._monotonic() - born > self._max_age:
                del self._entries[cache_key]
                return None
            self._entries.move_to_end(cache_key)
            return plaintext

    def put(self, cache_key: bytes, plaintext: bytes) -> None:
        with self._lock:
            self._entries[cache_key] = (self._monotonic(), plaintext)
            self._entries.move_to_end(cache_key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def forget(self, cache_key: bytes) -> None:
        with self._lock:
            self._entries.pop(cache_key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Vault:
    """Seal and open secrets under per-owner data keys."""

    def __init__(self, keys: KeyProvider, cache: DataKeyCache | None = None) -> None:
        self.keys = keys
        self._cache = cache
        self.kms_calls: Counter[str] = Counter()

    def seal(self, plaintext: bytes, context: Context, *, reuse: Sealed | None = None) -> Sealed:
        """Seal `plaintext`. With `reuse`, keep that data key (a refresh re-seals under the
        delegation's existing key: no KMS call when it is cached)."""
        if reuse is not None:
            data_key = self._unwrap(reuse.wrapped_key, reuse.key_id, context)
            wrapped, key_id = reuse.wrapped_key, reuse.key_id
        else:
            self.kms_calls["generate_data_key"] += 1
            generated = self.keys.generate_data_key(context)
            data_key, wrapped, key_id = generated.plaintext, generated.wrapped, generated.key_id
            if self._cache is not None:
                self._cache.put(DataKeyCache.key(wrapped, key_id, context), data_key)
        nonce = os.urandom(12)
        blob = BLOB_VERSION + nonce + AESGCM(data_key).encrypt(nonce, plaintext,
                                                                canonical(context))
        return Sealed(blob, wrapped, key_id)

    def open(self, sealed: Sealed | None, context: Context) -> bytes:
        if sealed is None or not sealed.blob or not sealed.wrapped_key:
            raise KeyDestroyed("the sealed data or its data key was destroyed")
        blob = sealed.blob
        if len(blob) < 1 + 12 + 16 or blob[:1] != BLOB_VERSION:
            raise SealedDataInvalid("sealed blob is truncated or of an unknown format")
        data_key = self._unwrap(sealed.wrapped_key, sealed.key_id, context)
        try:
            return AESGCM(data_key).decrypt(blob[1:13], blob[13:], canonical(context))
        except InvalidTag:
            raise SealedDataInvalid(
                "sealed blob does not open: altered, or bound to another owner"
            ) from None

    def rewrap(self, sealed_key: bytes, key_id: str, context: Context, new_key_id: str) -> bytes:
        """Re-wrap a data key under `new_key_id`; the blob it protects is untouched."""
        self.kms_calls["rewrap"] += 1
        return self.keys.rewrap(sealed_key, key_id, context, new_key_id)

    def forget(self, sealed: Sealed, context: Context) -> None:
        """Drop a data key from the cache (called when it is crypto-shredded)."""
        if self._cache is not None:
            self._cache.forget(DataKeyCache.key(sealed.wrapped_key, sealed.key_id, context))

    def _unwrap(self, wrapped: bytes, key_id: str, context: Context) -> bytes:
        cache_key = DataKeyCache.key(wrapped, key_id, context)
        if self._cache is not None:
            cached = self._cache.get(cache_key)
            if cached is not None:
                return cached
        self.kms_calls["decrypt"] += 1
        plaintext = self.keys.decrypt(wrapped, key_id, context)
        if self._cache is not None:
            self._cache.put(cache_key, plaintext)
        return plaintext
