"""Builds the Node service of `vmattach serve` (on the real libvirt)."""

from __future__ import annotations

import socket

from vmattach.common.config import Settings
from vmattach.common.grpcutil import Service
from vmattach.common.runner import CommandRunner
from vmattach.node.connectors import make_factory
from vmattach.node.hypervisor import Hypervisor
from vmattach.node.initiator import initiator_iqn
from vmattach.node.manager import NodeConfig, NodeManager
from vmattach.node.servicer import SERVICE_NAME, NodeServicer
from vmattach.v1 import node_pb2_grpc


def node_config(settings: Settings) -> NodeConfig:
    return NodeConfig(node_id=settings.node_id or socket.gethostname(),
                      node_ip=settings.node_ip,
                      initiator_iqn=initiator_iqn(settings.state_dir, settings.initiator_iqn),
                      max_volumes_per_server=settings.max_volumes_per_server,
                      detach_timeout=settings.detach_timeout,
                      detach_retries=settings.detach_retries)


def build_with(settings: Settings, runner: CommandRunner, hypervisor: Hypervisor) -> Service:
    """The Node service on a given hypervisor (tests pass the fake one)."""
    config = node_config(settings)
    connectors = make_factory(settings.iscsi_connector, hypervisor, runner, config.initiator_iqn,
                              settings.file_volume_dirs())
    manager = NodeManager(config, hypervisor, connectors)
    return Service(SERVICE_NAME, node_pb2_grpc.add_NodeServicer_to_server, NodeServicer(manager),
                   on_stop=[hypervisor.close], probes={"hypervisor": hypervisor.probe})


def build(settings: Settings, runner: CommandRunner) -> Service:
    from vmattach.node.libvirt_hypervisor import LibvirtHypervisor
    return build_with(settings, runner, LibvirtHypervisor(settings.libvirt_uri))
