import dataclasses

import pytest

from delegation.clock import FrozenClock
from delegation.errors import KeyDestroyed, SealedDataInvalid, UnknownKey
from delegation.kms import LocalKeyFile
from delegation.vault import DataKeyCache, Sealed, Vault, delegation_context

ALICE = delegation_context("user-a", "deleg-1", "agent-1")
BOB = delegation_context("user-b", "deleg-2", "agent-1")


@pytest.fixture
def keys(tmp_path):
    return LocalKeyFile(tmp_path / "key.json", warn=False)


@pytest.fixture
def vault(keys):
    cache = DataKeyCache(max_entries=100, max_age=300, monotonic=FrozenClock().monotonic)
    return Vault(keys, cache)


def test_seal_and_open_round_trip(vault):
    sealed = vault.seal(b'{"refresh_token": "rt-1"}', ALICE)
    assert b"rt-1" not in sealed.blob
    assert vault.open(sealed, ALICE) == b'{"refresh_token": "rt-1"}'


def test_a_blob_copied_onto_another_row_does_not_open(vault):
    sealed = vault.seal(b"alice's tokens", ALICE)
    with pytest.raises(SealedDataInvalid):
        vault.open(sealed, BOB)


def test_a_blob_swapped_with_another_rows_key_does_not_open(vault):
    alice = vault.seal(b"alice", ALICE)
    bob = vault.seal(b"bob", BOB)
    with pytest.raises(SealedDataInvalid):
        vault.open(Sealed(bob.blob, alice.wrapped_key, alice.key_id), ALICE)


@pytest.mark.parametrize("position", [0, 5, 20, -1])
def test_any_flipped_byte_is_detected(vault, position):
    sealed = vault.seal(b"some token material", ALICE)
    blob = bytearray(sealed.blob)
    blob[position] ^= 0x01
    with pytest.raises(SealedDataInvalid):
        vault.open(dataclasses.replace(sealed, blob=bytes(blob)), ALICE)


def test_a_tampered_wrapped_key_is_detected(keys):
    vault = Vault(keys)  # no cache: every open unwraps
    sealed = vault.seal(b"x", ALICE)
    wrapped = bytearray(sealed.wrapped_key)
    wrapped[-1] ^= 0x80
    with pytest.raises(SealedDataInvalid):
        vault.open(dataclasses.replace(sealed, wrapped_key=bytes(wrapped)), ALICE)


def test_shredded_data_is_gone(vault):
    sealed = vault.seal(b"x", ALICE)
    with pytest.raises(KeyDestroyed):
        vault.open(Sealed(sealed.blob, b"", sealed.key_id), ALICE)
    with pytest.raises(KeyDestroyed):
        vault.open(None, ALICE)


def test_cache_spares_kms_calls_on_reseal_and_open(vault):
    first = vault.seal(b"v1", ALICE)
    for i in range(10):
        first = vault.seal(f"v{i}".encode(), ALICE, reuse=first)
        vault.open(first, ALICE)
    assert vault.kms_calls == {"generate_data_key": 1}


def test_without_cache_every_open_unwraps(keys):
    vault = Vault(keys)
    sealed = vault.seal(b"v", ALICE)
    for _ in range(5):
        vault.open(sealed, ALICE)
    assert vault.kms_calls["decrypt"] == 5


def test_cache_is_bounded_in_size_and_age():
    clock = FrozenClock()
    cache = DataKeyCache(max_entries=2, max_age=10, monotonic=clock.monotonic)
    cache.put(b"a", b"ka")
    cache.put(b"b", b"kb")
    cache.put(b"c", b"kc")
    assert cache.get(b"a") is None and len(cache) == 2
    clock.advance(11)
    assert cache.get(b"b") is None


def test_reprs_hide_secrets(keys):
    data_key = keys.generate_data_key(ALICE)
    assert data_key.plaintext.hex() not in repr(data_key)


def test_local_key_file_is_private_and_reloads(tmp_path):
    path = tmp_path / "k.json"
    first = LocalKeyFile(path, warn=False)
    wrapped = first.generate_data_key(ALICE)
    assert path.stat().st_mode & 0o077 == 0
    again = LocalKeyFile(path, warn=False)
    assert again.decrypt(wrapped.wrapped, wrapped.key_id, ALICE) == wrapped.plaintext


def test_local_rotation_rewraps_under_the_new_key(keys):
    vault = Vault(keys)
    sealed = vault.seal(b"payload", ALICE)
    new_key = keys.add_key()
    rewrapped = vault.rewrap(sealed.wrapped_key, sealed.key_id, ALICE, new_key)
    assert vault.open(Sealed(sealed.blob, rewrapped, new_key), ALICE) == b"payload"


def test_unknown_local_key_is_a_clear_error(keys):
    with pytest.raises(UnknownKey, match="local key 'local:gone'"):
        keys.decrypt(b"x" * 40, "local:gone", ALICE)


def test_a_corrupt_key_file_is_refused(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{not json")
    with pytest.raises(UnknownKey, match="not a behalf local key file"):
        LocalKeyFile(path, warn=False)


def test_dev_key_file_warns(tmp_path, caplog):
    LocalKeyFile(tmp_path / "k.json")
    assert "DEV ONLY" in caplog.text
