"""The local administration commands: `vmattach pki init`, `vmattach token
create|list|revoke` and `vmattach rotate-key`. They work on the state
directory and the databases directly (settings as for `vmattach serve`),
never through an RPC."""

from __future__ import annotations

import logging
from pathlib import Path

from vmattach.common import auth, pki
from vmattach.common.config import Settings
from vmattach.common.db import close_database, open_database, with_connection, write_transaction
from vmattach.common.secretbox import SecretBox, add_key, key_file, read_keys, write_keys

LOG = logging.getLogger(__name__)


def pki_init(directory: str, hosts: str) -> list[Path]:
    return list(pki.init(directory, pki.parse_hosts(hosts)).values())


class _Tokens:
    def __init__(self, settings: Settings):
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = open_database(settings.database_url_for("auth"), auth.MODELS)
        self.store = auth.TokenStore(self.db)

    def __enter__(self) -> auth.TokenStore:
        return self.store

    def __exit__(self, *exc) -> None:
        close_database(self.db)


def tokens(settings: Settings) -> _Tokens:
    return _Tokens(settings)


# -- key rotation -----------------------------------------------------------------------------

class _Rows:
    """The stored secrets of one database, re-encrypted with a box."""

    def __init__(self, db, box: SecretBox):
        self.db, self.box = db, box

    @with_connection
    def controller(self) -> int:
        from vmattach.controller.models import Volume
        count = 0
        with write_transaction(self.db):
            for volume in Volume.select(Volume.id, Volume.chap_secret).where(
                    Volume.chap_secret.is_null(False)):
                Volume.update(chap_secret=self.box.rotate(volume.chap_secret)).where(
                    Volume.id == volume.id).execute()
                count += 1
        return count

    @with_connection
    def servers(self) -> int:
        import json

        from vmattach.server.models import BlockDeviceMapping as BDM
        count = 0
        with write_transaction(self.db):
            for bdm in BDM.select(BDM.id, BDM.connection_info).where(
                    BDM.connection_info.is_null(False)):
                data = json.loads(bdm.connection_info)
                sealed = data.get("data", {}).get("auth_password_encrypted")
                if not sealed:
                    continue
                data["data"]["auth_password_encrypted"] = self.box.rotate(sealed)
                BDM.update(connection_info=json.dumps(data, sort_keys=True)).where(
                    BDM.id == bdm.id).execute()
                count += 1
        return count


def rotate_key(settings: Settings) -> dict[str, int]:
    """Add a new key to each key file in use, re-encrypt every stored secret
    with it, then keep only the new key and the one before it (which still
    reads what a running process wrote before it re-read the file).
    Returns the number of secrets re-encrypted per service."""
    from vmattach.controller.models import MODELS as CONTROLLER_MODELS
    from vmattach.server.models import MODELS as SERVERS_MODELS
    done: dict[str, int] = {}
    plan = [("controller", "secret.key", CONTROLLER_MODELS),
            ("servers", "servers-secret.key", SERVERS_MODELS)]
    rotated: dict[Path, list[bytes]] = {}
    for service, name, models in plan:
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
            rows = _Rows(db, SecretBox(rotated[path], path))
            done[service] = rows.controller() if service == "controller" else rows.servers()
        finally:
            close_database(db)
    for path, keys in rotated.items():
        if read_keys(path) == keys:
            write_keys(path, keys[:2])
    return done
