"""Key providers: who wraps the data keys. AWS KMS in production, a local key file in dev.

Both bind every wrapped key to an encryption context, so a wrapped key copied to another
delegation's row fails to unwrap. Foreign errors become our error tree here, at the adapter.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from delegation.errors import KmsUnavailable, SealedDataInvalid, UnknownKey

log = logging.getLogger(__name__)

Context = Mapping[str, str]


def canonical(context: Context) -> bytes:
    """The one byte string a context stands for (sorted keys, no spaces)."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, repr=False)
class DataKey:
    plaintext: bytes
    wrapped: bytes
    key_id: str

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}, plaintext=<hidden>)"


class KeyProvider(Protocol):
    """Wraps and unwraps 256-bit data keys under a master key, bound to a context."""

    @property
    def key_id(self) -> str:
        """The key new data keys are wrapped under."""
        ...

    def generate_data_key(self, context: Context) -> DataKey: ...

    def decrypt(self, wrapped: bytes, key_id: str, context: Context) -> bytes: ...

    def rewrap(self, wrapped: bytes, key_id: str, context: Context, new_key_id: str) -> bytes: ...


# --- AWS KMS ---------------------------------------------------------------------------------

_RETRYABLE_CODES = {
    "KMSInternalException",
    "ThrottlingException",
    "DependencyTimeoutException",
    "LimitExceededException",
    "ServiceUnavailable",
    "InternalFailure",
}
_UNKNOWN_KEY_CODES = {
    "NotFoundException",
    "DisabledException",
    "KMSInvalidStateException",
    "InvalidKeyUsageException",
    "AccessDeniedException",
}


class AwsKms:
    """AWS KMS through an injected boto3 client (the network stays a constructor argument)."""

    def __init__(self, client: Any, key_id: str) -> None:
        self._client = client
        self._key_id = key_id

    @property
    def key_id(self) -> str:
        return self._key_id

    def generate_data_key(self, context: Context) -> DataKey:
        answer = self._call(
            "generate_data_key",
            KeyId=self._key_id,
            KeySpec="AES_256",
            EncryptionContext=dict(context),
        )
        return DataKey(answer["Plaintext"], answer["CiphertextBlob"], answer["KeyId"])

    def decrypt(self, wrapped: bytes, key_id: str, context: Context) -> bytes:
        answer = self._call(
            "decrypt", CiphertextBlob=wrapped, KeyId=key_id, EncryptionContext=dict(context)
        )
        plaintext: bytes = answer["Plaintext"]
        return plaintext

    def rewrap(self, wrapped: bytes, key_id: str, context: Context, new_key_id: str) -> bytes:
        answer = self._call(
            "re_encrypt",
            CiphertextBlob=wrapped,
            SourceKeyId=key_id,
            SourceEncryptionContext=dict(context),
            DestinationKeyId=new_key_id,
            DestinationEncryptionContext=dict(context),
        )
        blob: bytes = answer["CiphertextBlob"]
        return blob

    def resolve(self, key_id: str) -> str:
        """The ARN of `key_id` (an alias or id), failing clearly when it does not exist."""
        arn: str = self._call("describe_key", KeyId=key_id)["KeyMetadata"]["Arn"]
        return arn

    def _call(self, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
        )

        try:
            return getattr(self._client, operation)(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _RETRYABLE_CODES:
                raise KmsUnavailable(f"KMS {operation}: {code}", retry_after=1.0) from exc
            if code == "InvalidCiphertextException":
                raise SealedDataInvalid(
                    f"KMS {operation}: the wrapped key does not match its context or key"
                ) from exc
            if code in _UNKNOWN_KEY_CODES:
                raise UnknownKey(f"KMS {operation}: key unusable ({code})") from exc
            raise KmsUnavailable(f"KMS {operation}: {code or 'error'}") from exc
        except (ConnectionError, HTTPClientError) as exc:
            raise KmsUnavailable(f"KMS {operation}: unreachable", retry_after=1.0) from exc
        except BotoCoreError as exc:
            raise KmsUnavailable(f"KMS {operation}: {type(exc).__name__}") from exc


def aws_kms_client(region: str, endpoint_url: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=2,
                    read_timeout=5)
    return boto3.client("kms", region_name=region, endpoint_url=endpoint_url or None,
                        config=config)


# --- local key file (dev only) ----------------------------------------------------------------

DEV_WARNING = (
    "DEV ONLY: data keys are wrapped with a local key file, not KMS. "
    "Anyone who can read this file can read every token. Never use it in production."
)


class LocalKeyFile:
    """A keyring of AES-256 master keys in a JSON file; the newest is current.

    For the embedded default only: settings refuse it in production, and it warns at start.
    """

    def __init__(self, path: Path, *, warn: bool = True) -> None:
        self._path = path
        self._keys, self._current = self._load_or_create()
        if warn:
            log.warning("%s (%s)", DEV_WARNING, path)

    @property
    def key_id(self) -> str:
        return self._current

    def generate_data_key(self, context: Context) -> DataKey:
        plaintext = secrets.token_bytes(32)
        return DataKey(plaintext, self._wrap(plaintext, self._current, context), self._current)

    def decrypt(self, wrapped: bytes, key_id: str, context: Context) -> bytes:
        master = self._keys.get(key_id)
        if master is None:
            raise UnknownKey(f"local key {key_id!r} is not in {self._path}")
        if len(wrapped) < 13:
            raise SealedDataInvalid("wrapped key is truncated")
        try:
            return AESGCM(master).decrypt(wrapped[:12], wrapped[12:], _aad(key_id, context))
        except InvalidTag:
            raise SealedDataInvalid(
                "the wrapped key does not match its context or key"
            ) from None

    def rewrap(self, wrapped: bytes, key_id: str, context: Context, new_key_id: str) -> bytes:
        return self._wrap(self.decrypt(wrapped, key_id, context), new_key_id, context)

    def add_key(self) -> str:
        """Create a new master key, make it current, and return its id (for `keys rotate`)."""
        key_id = f"local:{secrets.token_hex(4)}"
        self._keys[key_id] = AESGCM.generate_key(bit_length=256)
        self._current = key_id
        self._save()
        return key_id

    def _wrap(self, plaintext: bytes, key_id: str, context: Context) -> bytes:
        master = self._keys.get(key_id)
        if master is None:
            raise UnknownKey(f"local key {key_id!r} is not in {self._path}")
        nonce = os.urandom(12)
        return nonce + AESGCM(master).encrypt(nonce, plaintext, _aad(key_id, context))

    def _load_or_create(self) -> tuple[dict[str, bytes], str]:
        if self._path.exists():
            try:
                doc = json.loads(self._path.read_text())
                keys = {k: base64.b64decode(v) for k, v in doc["keys"].items()}
                current = doc["current"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UnknownKey(f"{self._path} is not a behalf local key file") from exc
            if current not in keys or any(len(k) != 32 for k in keys.values()):
                raise UnknownKey(f"{self._path} is not a behalf local key file")
            return keys, current
        self._keys = {}
        self._current = ""
        key_id = self.add_key()
        return self._keys, key_id

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "warning": DEV_WARNING,
            "current": self._current,
            "keys": {k: base64.b64encode(v).decode() for k, v in self._keys.items()},
        }
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(doc, handle, indent=2)
        tmp.replace(self._path)


def _aad(key_id: str, context: Context) -> bytes:
    return key_id.encode() + b"\x00" + canonical(context)
