"""Secrets at rest: Fernet (AES-128-CBC + HMAC-SHA256) with keys kept in a
key file readable by its owner only (0600): by default one generated in the
state directory, or the shared file of --secret-key-file (facade replicas on
other hosts decrypt each other's rows with it).

The key file holds one key per line, the newest first: encryption uses the
first, decryption tries each (MultiFernet), so `vmattach rotate-key` can add a
key, re-encrypt every stored secret, and the previous key still reads what a
process wrote a moment before it noticed the new file. A SecretBox re-reads
its file when the file changes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from vmattach.common.errors import BackendError, InvalidArgument


def _create(path: Path) -> None:
    """A new key file with one key; nothing when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_keys(path: Path) -> list[bytes]:
    for _ in range(100):  # another process may be writing the key right now
        keys = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
        if keys:
            return keys
    raise InvalidArgument(f"the key file {path} is empty")


def write_keys(path: Path, keys: list[bytes]) -> None:
    """Replace the key file at once (a new 0600 file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join(k + b"\n" for k in keys))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SecretBox:
    def __init__(self, key: bytes | list[bytes], path: Path | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._set(key if isinstance(key, list) else [key])
        if path is not None:
            self._stamp = self._stat()

    def _set(self, keys: list[bytes]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError:
            raise InvalidArgument("a key in the key file is not a Fernet key") from None

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # type: ignore[arg-type]
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _current(self) -> MultiFernet:
        """The keys, re-read when the key file changed (a rotation)."""
        if self.path is not None:
            try:
                stamp = self._stat()
            except OSError:
                return self._fernet
            if stamp != self._stamp:
                with self._lock:
                    self._set(read_keys(self.path))
                    self._stamp = stamp
        return self._fernet

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SecretBox:
        """The keys of path, a new key file (0600) when it is absent."""
        path = Path(path)
        _create(path)
        return cls(read_keys(path), path)

    @classmethod
    def from_state_dir(cls, state_dir: str | os.PathLike, name: str = "secret.key") -> SecretBox:
        return cls.from_file(Path(state_dir) / name)

    @classmethod
    def for_settings(cls, settings, name: str = "secret.key") -> SecretBox:
        """--secret-key-file when given, else STATE_DIR/name."""
        return cls.from_file(key_file(settings, name))

    def encrypt(self, plain: str) -> str:
        return self._current().encrypt(plain.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._current().decrypt(token.encode()).decode()
        except InvalidToken:
            raise BackendError("a stored secret cannot be decrypted with this key file's keys") from None

    def rotate(self, token: str) -> str:
        """token re-encrypted with the newest key."""
        try:
            return self._current().rotate(token.encode()).decode()
        except InvalidToken:
            raise BackendError("a stored secret cannot be decrypted with this key file's keys") from None


def key_file(settings, name: str = "secret.key") -> Path:
    return Path(settings.secret_key_file or Path(settings.state_dir) / name)


def add_key(path: Path) -> list[bytes]:
    """Put a new key first in path; returns the keys now in it."""
    _create(path)
    keys = [Fernet.generate_key(), *read_keys(path)]
    write_keys(path, keys)
    return keys
