"""The local administration commands: `vmattach pki init`, `vmattach token
create|list|revoke` and `vmattach rotate-key`. They work on the state
directory and the databases directly (settings as for `vmattach serve`),
never through an RPC."""

from __future__ import annotations

import logging
from pathlib import Path

from vmattach.common import auth, pki
from vmattach.common.config import Settings
from vmattach.common.db import close_database, open_database
from vmattach.common.secretbox import SecretBox, add_key, key_file, read_keys, write_keys

LOG = logging.getLogger(__name__)


def pki_init(directory: str, hosts: str) -> list[Path]:
    return list(pki.init(directory, pki.parse_hosts(hosts)).values())


class _Tokens:
    def __init__(self, settings: Settings):
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = open_database(settings.database_url_for("auth"), auth.MODELS, auth.SCHEMA,
                                upgrade=settings.db_upgrade)
        self.store = auth.TokenStore(self.db)

    def __enter__(self) -> auth.TokenStore:
        return self.store

    def __exit__(self, *exc) -> None:
        close_database(self.db)


def tokens(settings: Settings) -> _Tokens:
    return _Tokens(settings)


# -- key rotation -----------------------------------------------------------------------------

def rotate_key(settings: Settings) -> dict[str, int]:
    """Add a new key to each key file in use, re-encrypt every stored secret
    with it, then keep only the new key and the one before it (which still
    reads what a running process wrote before it re-read the file).
    Returns the number of secrets re-encrypted per service."""
    from vmattach.clients.serve import SECRET_STORES
    done: dict[str, int] = {}
    rotated: dict[Path, list[bytes]] = {}
    for service, name, models, rotate in SECRET_STORES:
        path = key_file(settings, name)
        url = settings.database_url_for(service)
        if not path.exists() and not settings.secret_key_file:
            continue  # this service never ran with this state directory
        if url.startswith("sqlite") and not settings.database_url and not Path(
                url.split("///", 1)[1]).exists():
            continue
        if path not in rotated:
            rotated[path] = add_key(path)
        db = open_database(url, models)
        try:
            done[service] = rotate(db, SecretBox(rotated[path], path))
        finally:
            close_database(db)
    for path, keys in rotated.items():
        if read_keys(path) == keys:
            write_keys(path, keys[:2])
    return done
