"""Builds the Controller service of `vmattach serve`: its database, tgtd
through tgtadm, and the loop that brings exports back after a tgtd restart."""

from __future__ import annotations

import logging
import threading

from vmattach.common.config import Settings
from vmattach.common.db import close_database, open_database, probe_database
from vmattach.common.grpcutil import Service
from vmattach.common.periodic import BACKGROUND_SHARE, Pacer, every
from vmattach.common.rules import check_iqn_prefix
from vmattach.common.runner import CommandRunner
from vmattach.common.secretbox import SecretBox
from vmattach.controller.models import MODELS, SCHEMA
from vmattach.controller.servicer import SERVICE_NAME, ControllerServicer
from vmattach.controller.tgt import TgtAdm
from vmattach.controller.volumes import VolumeManager
from vmattach.v1 import controller_pb2_grpc

LOG = logging.getLogger(__name__)


def build(settings: Settings, runner: CommandRunner) -> Service:
    iqn_prefix = check_iqn_prefix(settings.iqn_prefix)
    db = open_database(settings.database_url_for("controller"), MODELS, SCHEMA,
                       upgrade=settings.db_upgrade)
    tgt = TgtAdm(runner, settings.tgt_control_port)
    url = settings.database_url_for("controller")
    manager = VolumeManager(db, settings.volume_path(), tgt,
                            settings.tgt_portal, SecretBox.for_settings(settings),
                            settings.max_volume_gb, iqn_prefix=iqn_prefix,
                            quota_gigabytes=settings.quota_gigabytes)

    def ensure_exports() -> None:
        restored = manager.ensure_exports(Pacer(BACKGROUND_SHARE))
        if restored:
            LOG.warning("re-created %d tgt exports", restored)

    # at start (at full speed: nothing is served yet), and every interval: a
    # restarted tgtd has no targets. A round paces itself to a tenth of a core: at
    # a cell's 100,000 exports it takes seconds of CPU, which the attaches need too
    manager.ensure_exports()
    stop = threading.Event()
    every(settings.reconcile_interval, ensure_exports, stop, "ensure-exports", now=False)
    return Service(SERVICE_NAME, controller_pb2_grpc.add_ControllerServicer_to_server,
                   ControllerServicer(manager), on_stop=[stop.set, tgt.close, lambda: close_database(db)],
                   probes={"tgtd": tgt.ping, "database": lambda: probe_database(url)})
