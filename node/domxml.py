"""libvirt XML for the Node, built and read with ElementTree only (user
input never goes through string formatting)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from vmattach.node.hypervisor import (
    BlockSource,
    Disk,
    DiskSource,
    DiskSpec,
    FileSource,
    IscsiSource,
    SecretSpec,
)


def _source(disk: ET.Element, source: DiskSource) -> str:
    """Add the <source> (and <auth>) of source to disk; returns the disk type."""
    if isinstance(source, IscsiSource):
        src = ET.SubElement(disk, "source", protocol="iscsi",
                            name=f"{source.target_iqn}/{source.lun}")
        ET.SubElement(src, "host", name=source.host, port=str(source.port))
        initiator = ET.SubElement(src, "initiator")
        ET.SubElement(initiator, "iqn", name=source.initiator_iqn)
        if source.auth_username:
            auth = ET.SubElement(disk, "auth", username=source.auth_username)
            ET.SubElement(auth, "secret", type="iscsi", usage=source.secret_usage)
        return "network"
    if isinstance(source, BlockSource):
        ET.SubElement(disk, "source", dev=source.path)
        return "block"
    if isinstance(source, FileSource):
        ET.SubElement(disk, "source", file=source.path)
        return "file"
    raise TypeError(f"unknown disk source {type(source).__name__}")


def disk_xml(spec: DiskSpec) -> str:
    """The <disk> element of spec (Nova's LibvirtConfigGuestDisk)."""
    disk = ET.Element("disk", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache=spec.cache)
    disk.set("type", _source(disk, spec.source))
    ET.SubElement(disk, "target", dev=spec.device, bus=spec.bus)
    ET.SubElement(disk, "serial").text = spec.serial
    ET.SubElement(disk, "alias", name=spec.alias)
    if spec.readonly:
        ET.SubElement(disk, "readonly")
    if spec.shareable:
        ET.SubElement(disk, "shareable")
    return ET.tostring(disk, encoding="unicode")


def secret_xml(spec: SecretSpec) -> str:
    secret = ET.Element("secret", ephemeral="no", private="yes")
    if spec.description:
        ET.SubElement(secret, "description").text = spec.description
    usage = ET.SubElement(secret, "usage", type="iscsi")
    ET.SubElement(usage, "target").text = spec.usage
    return ET.tostring(secret, encoding="unicode")


def _disk(el: ET.Element) -> Disk:
    target = el.find("target")
    alias = el.find("alias")
    return Disk(device=target.get("dev", "") if target is not None else "",
                bus=target.get("bus", "") if target is not None else "",
                serial=(el.findtext("serial") or "").strip(),
                alias=alias.get("name", "") if alias is not None else "")


NOVA_NS_PREFIX = "http://openstack.org/xmlns/libvirt/nova/"


def parse_disks(domain_xml: str) -> tuple[Disk, ...]:
    """The disks of a domain XML, in document order."""
    root = ET.fromstring(domain_xml)
    return tuple(_disk(el) for el in root.iterfind("devices/disk"))


def parse_project(root: ET.Element) -> str:
    """The owner project's id as Nova writes it into <metadata>:
    <nova:instance><nova:owner><nova:project uuid="..."> (any version of
    Nova's namespace); "" when there is none."""
    metadata = root.find("metadata")
    if metadata is None:
        return ""
    for instance in metadata:
        if not (instance.tag.startswith("{" + NOVA_NS_PREFIX) and instance.tag.endswith("}instance")):
            continue
        ns = instance.tag[1:].split("}", 1)[0]
        project = instance.find(f"{{{ns}}}owner/{{{ns}}}project")
        if project is not None:
            return (project.get("uuid") or "").strip()[:64]
    return ""


@dataclass(frozen=True)
class DomainXml:
    """What the Node reads from a domain's (live) XML."""
    name: str
    active: bool  # libvirt gives a domain an id while it runs, and writes it only then
    disks: tuple[Disk, ...]
    project_id: str


def read_domain(domain_xml: str) -> DomainXml:
    """Name, running or not, disks and owner project of a domain's XML
    (virDomainGetXMLDesc without flags), parsed once."""
    root = ET.fromstring(domain_xml)
    return DomainXml(name=(root.findtext("name") or "").strip(),
                     active=root.get("id", "-1") not in ("", "-1"),
                     disks=tuple(_disk(el) for el in root.iterfind("devices/disk")),
                     project_id=parse_project(root))


def find_disk_xml(domain_xml: str, device: str) -> str | None:
    """The <disk> element whose target is device, as XML; None when absent."""
    root = ET.fromstring(domain_xml)
    for el in root.iterfind("devices/disk"):
        target = el.find("target")
        if target is not None and target.get("dev") == device:
            return ET.tostring(el, encoding="unicode")
    return None
