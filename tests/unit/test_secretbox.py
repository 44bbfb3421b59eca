"""common/secretbox.py: what a SecretBox remembers of the tokens it sealed or
opened, and that a change of keys forgets it."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from vmattach.common import secretbox
from vmattach.common.errors import BackendError
from vmattach.common.secretbox import SecretBox, write_keys


def count_opens(box: SecretBox, monkeypatch) -> list[int]:
    """How many tokens box's Fernet keys open from now on (a list of one count)."""
    opened = [0]
    fernet_decrypt = type(box._fernet).decrypt

    def counting(self, token, *args, **kwargs):
        opened[0] += 1
        return fernet_decrypt(self, token, *args, **kwargs)
    monkeypatch.setattr(type(box._fernet), "decrypt", counting)
    return opened


def test_a_token_sealed_or_opened_once_opens_again_from_memory(tmp_path, monkeypatch):
    box = SecretBox.from_file(tmp_path / "secret.key")
    sealed = box.encrypt("chap-password")
    written_elsewhere = SecretBox.from_file(tmp_path / "secret.key").encrypt("another")
    opened = count_opens(box, monkeypatch)
    assert box.decrypt(sealed) == "chap-password"
    assert opened[0] == 0  # sealed here: remembered
    assert box.decrypt(written_elsewhere) == "another"
    assert box.decrypt(written_elsewhere) == "another"
    assert opened[0] == 1  # opened once, then remembered


def test_a_key_retired_from_the_file_opens_nothing_it_sealed_even_from_memory(tmp_path):
    path = tmp_path / "secret.key"
    box = SecretBox.from_file(path)
    sealed = box.encrypt("chap-password")
    assert box.decrypt(sealed) == "chap-password"
    write_keys(path, [Fernet.generate_key()])  # the old key is gone: rotated and retired
    with pytest.raises(BackendError, match="cannot be decrypted"):
        box.decrypt(sealed)
    assert box.decrypt(box.encrypt("new")) == "new"


def test_at_most_cached_tokens_are_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(secretbox, "CACHED", 3)
    box = SecretBox.from_file(tmp_path / "secret.key")
    tokens = [box.encrypt(f"secret-{i}") for i in range(5)]
    assert list(box._plain) == tokens[2:]  # the oldest forgotten
    opened = count_opens(box, monkeypatch)
    assert [box.decrypt(t) for t in tokens[2:]] == ["secret-2", "secret-3", "secret-4"]
    assert opened[0] == 0
    assert [box.decrypt(t) for t in tokens[:2]] == ["secret-0", "secret-1"]
    assert opened[0] == 2  # the two forgotten ones opened with the key again
