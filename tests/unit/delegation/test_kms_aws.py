import socket

import pytest

from delegation.errors import KmsUnavailable, SealedDataInvalid, UnknownKey
from delegation.kms import AwsKms, aws_kms_client
from delegation.vault import Sealed, Vault, delegation_context

ALICE = delegation_context("user-a", "deleg-1", "agent-1")
BOB = delegation_context("user-b", "deleg-2", "agent-1")


def test_envelope_round_trip_through_kms(aws_kms):
    vault = Vault(aws_kms)
    sealed = vault.seal(b"tokens", ALICE)
    assert sealed.key_id == aws_kms.key_id
    assert vault.open(sealed, ALICE) == b"tokens"


def test_kms_enforces_the_encryption_context(aws_kms):
    data_key = aws_kms.generate_data_key(ALICE)
    with pytest.raises(SealedDataInvalid):
        aws_kms.decrypt(data_key.wrapped, data_key.key_id, BOB)


def test_an_unknown_key_is_a_clear_error(kms_client):
    kms = AwsKms(kms_client, "alias/does-not-exist")
    with pytest.raises(UnknownKey, match="NotFoundException"):
        kms.generate_data_key(ALICE)
    with pytest.raises(UnknownKey):
        kms.resolve("alias/does-not-exist")


def test_rewrap_under_a_new_key_keeps_the_blob(kms_client, aws_kms):
    new_key = kms_client.create_key()["KeyMetadata"]["Arn"]
    vault = Vault(aws_kms)
    sealed = vault.seal(b"tokens", ALICE)
    rewrapped = vault.rewrap(sealed.wrapped_key, sealed.key_id, ALICE, new_key)
    kms_client.disable_key(KeyId=aws_kms.key_id.rsplit("/", 1)[1])
    assert vault.open(Sealed(sealed.blob, rewrapped, new_key), ALICE) == b"tokens"


def test_a_kms_outage_is_retryable_and_says_so(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = aws_kms_client("us-east-1", f"http://127.0.0.1:{port}")
    kms = AwsKms(client, "alias/anything")
    with pytest.raises(KmsUnavailable, match="unreachable") as info:
        kms.generate_data_key(ALICE)
    assert info.value.retryable
