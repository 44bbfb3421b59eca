"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) with a key file kept
in the state directory, readable by its owner only."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from vmattach.common.errors import BackendError


class SecretBox:
    def __init__(self, key: bytes):
        self._fernet = Fernet(key)

    @classmethod
    def from_state_dir(cls, state_dir: str | os.PathLike, name: str = "secret.key") -> SecretBox:
        path = Path(state_dir) / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
                f.flush()
                os.fsync(f.fileno())
        key = b""
        for _ in range(100):  # another process may be writing the key right now
            key = path.read_bytes().strip()
            if key:
                break
        return cls(key)

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise BackendError("a stored secret cannot be decrypted with this state directory's key") from None
