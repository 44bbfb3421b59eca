"""The disk and secret XML the Node gives libvirt, parsed back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.support.node_helpers import CHAP_USER, NODE_IQN, new_id, target_iqn
from vmattach.node.domxml import disk_xml, find_disk_xml, parse_disks, secret_xml
from vmattach.node.hypervisor import (
    BlockSource,
    Disk,
    DiskSpec,
    FileSource,
    IscsiSource,
    SecretSpec,
    volume_alias,
)
from vmattach.node.manager import parse_device

VID = new_id()
SOURCES = {
    "network": IscsiSource(target_iqn=target_iqn(VID), lun=1, host="127.0.0.1", port=3260,
                           initiator_iqn=NODE_IQN, auth_username=CHAP_USER,
                           secret_usage=f"volume-{VID}"),
    "block": BlockSource(f"/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{target_iqn(VID)}-lun-1"),
    "file": FileSource("/var/lib/vmattach/volumes/volume-x.img"),
}


def build(device: str, kind: str) -> ET.Element:
    name, bus = parse_device(device)
    spec = DiskSpec(device=name, bus=bus, serial=VID, alias=volume_alias(VID),
                    source=SOURCES[kind])
    return ET.fromstring(disk_xml(spec))


@pytest.mark.parametrize("kind", sorted(SOURCES))
@pytest.mark.parametrize("device, bus", [("/dev/vdb", "virtio"), ("/dev/sdb", "scsi"),
                                         ("/dev/hdc", "ide")])
def test_disk_xml_common_parts(device, bus, kind):
    disk = build(device, kind)
    assert disk.tag == "disk" and disk.get("type") == kind and disk.get("device") == "disk"
    assert disk.find("target").attrib == {"dev": device[5:], "bus": bus}
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw", "cache": "none"}
    assert disk.findtext("serial") == VID
    assert disk.find("alias").get("name") == f"ua-{VID}"
    assert disk.find("readonly") is None


def test_network_disk_has_iscsi_source_initiator_and_auth():
    disk = build("/dev/vdb", "network")
    source = disk.find("source")
    assert source.attrib == {"protocol": "iscsi", "name": f"{target_iqn(VID)}/1"}
    assert source.find("host").attrib == {"name": "127.0.0.1", "port": "3260"}
    assert source.find("initiator/iqn").get("name") == NODE_IQN
    assert disk.find("auth").get("username") == CHAP_USER
    assert disk.find("auth/secret").attrib == {"type": "iscsi", "usage": f"volume-{VID}"}


def test_block_and_file_sources():
    assert build("/dev/sdb", "block").find("source").attrib == {"dev": SOURCES["block"].path}
    assert build("/dev/sdb", "file").find("source").attrib == {"file": SOURCES["file"].path}
    assert build("/dev/sdb", "file").find("auth") is None


def test_user_input_is_escaped_not_formatted():
    spec = DiskSpec(device="vdb", bus="virtio", serial="a'/><evil/>", alias="ua-x",
                    source=FileSource("/tmp/a'b\"<c>.img"))
    disk = ET.fromstring(disk_xml(spec))
    assert disk.findtext("serial") == "a'/><evil/>" and disk.find(".//evil") is None
    assert disk.find("source").get("file") == "/tmp/a'b\"<c>.img"


def test_readonly_disk():
    spec = DiskSpec("vdb", "virtio", VID, "ua-x", FileSource("/x"), readonly=True)
    assert ET.fromstring(disk_xml(spec)).find("readonly") is not None


def test_secret_xml_is_private_and_persistent():
    secret = ET.fromstring(secret_xml(SecretSpec(f"volume-{VID}", b"pw", "d")))
    assert secret.attrib == {"ephemeral": "no", "private": "yes"}
    assert secret.find("usage").get("type") == "iscsi"
    assert secret.findtext("usage/target") == f"volume-{VID}"
    assert b"pw" not in ET.tostring(secret)


DOMAIN = f"""<domain type='qemu'><name>vm</name><devices>
  <disk type='file' device='disk'><source file='/root.img'/><target dev='vda' bus='virtio'/>
    <alias name='virtio-disk0'/></disk>
  <disk type='network' device='disk'><target dev='sdb' bus='scsi'/><serial>{VID}</serial>
    <alias name='ua-{VID}'/></disk>
</devices></domain>"""


def test_parse_disks_and_find_disk_xml():
    assert parse_disks(DOMAIN) == (Disk("vda", "virtio", "", "virtio-disk0"),
                                   Disk("sdb", "scsi", VID, f"ua-{VID}"))
    assert ET.fromstring(find_disk_xml(DOMAIN, "sdb")).findtext("serial") == VID
    assert find_disk_xml(DOMAIN, "vdc") is None


def test_shareable_disk():
    spec = DiskSpec("vdb", "virtio", VID, "ua-x", FileSource("/x"), shareable=True)
    disk = ET.fromstring(disk_xml(spec))
    assert disk.find("shareable") is not None and disk.find("driver").get("cache") == "none"
    assert ET.fromstring(disk_xml(DiskSpec("vdb", "virtio", VID, "ua-x",
                                           FileSource("/x")))).find("shareable") is None


NOVA_DOMAIN = """<domain type='kvm'>
  <name>instance-00000001</name>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="27.1.0"/>
      <nova:name>web-1</nova:name>
      <nova:owner>
        <nova:user uuid="5e0c6d4b7f0a4d8e9d5d1f2a3b4c5d6e">alice</nova:user>
        <nova:project uuid="8a3b0c1d2e3f40516273849506a7b8c9">demo</nova:project>
      </nova:owner>
    </nova:instance>
  </metadata>
  <devices><disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk></devices>
</domain>"""


def test_the_owner_project_is_read_the_way_nova_writes_it():
    import xml.etree.ElementTree as ET

    from vmattach.node.domxml import parse_project, read_domain
    dom = read_domain(NOVA_DOMAIN)
    assert dom.project_id == "8a3b0c1d2e3f40516273849506a7b8c9" and dom.disks[0].device == "vda"
    assert parse_project(ET.fromstring(NOVA_DOMAIN.replace("nova/1.1", "nova/1.2"))) \
        == "8a3b0c1d2e3f40516273849506a7b8c9"
    assert parse_project(ET.fromstring("<domain><name>x</name></domain>")) == ""
    # another tool's metadata with the same element names is not Nova's
    other = NOVA_DOMAIN.replace("http://openstack.org/xmlns/libvirt/nova/1.1",
                                "http://example.org/not-nova")
    assert parse_project(ET.fromstring(other)) == ""


def test_a_running_domain_is_told_by_its_id():
    from vmattach.node.domxml import read_domain
    running = read_domain(NOVA_DOMAIN.replace("<domain type='kvm'>", "<domain type='kvm' id='7'>"))
    assert running.active and running.name == "instance-00000001"
    assert not read_domain(NOVA_DOMAIN).active  # an inactive domain's XML has no id
    assert not read_domain(NOVA_DOMAIN.replace("<domain type='kvm'>",
                                               "<domain type='kvm' id='-1'>")).active
