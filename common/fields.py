"""The bounds of every input field of every RPC, in one table.

FIELD_RULES holds, for each field of each request message of the three
services (and of every message a request carries: Connector,
ConnectionInfo, ConnectionData, StagedVolume), its rule: length, alphabet,
range or grammar. The server interceptor (common/grpcutil.py) checks every
request against it before a servicer sees it, so that no value reaches a
database, a command or libvirt that they would refuse; a refused value is
INVALID_ARGUMENT naming the field, with a google.rpc.BadRequest field
violation next to the ErrorInfo. tests/unit/test_fields.py fails when a
field of a request has no rule.

The table bounds; the services still decide (a volume's size within the
service's maximum, a volume name's alphabet, whether a field is required)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from vmattach.common import pagetoken
from vmattach.common.errors import InvalidArgument
from vmattach.common.rules import (
    MAX_DEVICE_LENGTH,
    MAX_ISCSI_NAME,
    PROJECT_RE,
    check_device,
    quote,
    require_iscsi_name,
)
from vmattach.v1 import controller_pb2, node_pb2, servers_pb2, types_pb2

INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
MAX_SIZE_GB = 1 << 20          # 1 PiB: above any max_volume_gb (the service checks its own)
MAX_SIZE_BYTES = 1 << 60
MAX_VIOLATIONS = 8             # field violations listed in one answer


class Violation(Exception):
    """One field's value is refused (description: what is wrong, never the
    whole value; reason: the ErrorInfo reason of a rule of common/rules.py)."""

    def __init__(self, description: str, reason: str | None = None):
        super().__init__(description)
        self.reason = reason


@dataclass(frozen=True)
class Text:
    """A string field: at most max_len characters (and max_bytes in UTF-8),
    printable (no NUL, no control character), matching pattern, then
    `check` (a grammar of common/rules.py, checked first). Empty is always let through:
    whether a field is required is the service's decision. A secret's value
    is never quoted."""
    max_len: int
    pattern: re.Pattern | None = None
    what: str = ""
    check: Callable[[str, str], object] | None = None
    secret: bool = False
    max_bytes: int = 0

    def __call__(self, value: str, path: str) -> None:
        if not value:
            return
        if self.check is not None:  # a grammar of common/rules.py, with its own message
            try:
                self.check(value, path)
            except InvalidArgument as exc:
                raise Violation(exc.message, exc.reason) from None
        if len(value) > self.max_len or (self.max_bytes and len(value.encode("utf-8", "surrogatepass"))
                                         > self.max_bytes):
            raise Violation(f"{path} is longer than {self.max_len} characters ({len(value)})")
        if not value.isprintable():
            raise Violation(f"{path}{self._shown(value)} has a control character (printable"
                            " characters only)")
        if self.pattern is not None and not self.pattern.match(value):
            raise Violation(f"{path}{self._shown(value)} is not {self.what}")

    def _shown(self, value: str) -> str:
        return "" if self.secret else f" {quote(value, 40)}"


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int

    def __call__(self, value: int, path: str) -> None:
        if not self.lo <= value <= self.hi:
            raise Violation(f"{path} must be between {self.lo} and {self.hi}")


@dataclass(frozen=True)
class Enum:
    enum: EnumDescriptor

    def __call__(self, value: int, path: str) -> None:
        if value not in self.enum.values_by_number:
            names = ", ".join(v.name for v in self.enum.values if v.number)
            raise Violation(f"{path} must be one of {names}")


@dataclass(frozen=True)
class Nested:
    """A message field: its own fields are checked by their rules."""


@dataclass(frozen=True)
class Entries:
    """A repeated or map field: at most max_items entries, each key and
    value (or each item) by its rule."""
    max_items: int
    item: Text | Int | None = None
    key: Text | None = None

    def __call__(self, value, path: str) -> None:
        if len(value) > self.max_items:
            raise Violation(f"{path} has more than {self.max_items} entries ({len(value)})")


class AnyBool:
    def __call__(self, value: bool, path: str) -> None:
        pass


Rule = Text | Int | Enum | Nested | Entries | AnyBool


def _uuid(value: str, path: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{path} {quote(value, 40)} is not a UUID") from None


def _device(value: str, path: str) -> None:
    check_device(value, path)


def _iscsi_name(value: str, path: str) -> None:
    require_iscsi_name(value, path)


def _page_token(value: str, path: str) -> None:
    if not re.fullmatch(r"p1\.[A-Za-z0-9_-]+", value):
        raise InvalidArgument(f"{path} is not valid (pass the next_page_token of the previous"
                              " page, or nothing for the first page)")


# The kinds of field ----------------------------------------------------------------------

ID = Text(45, re.compile(r"^[0-9A-Za-z{}:-]+$"), "a UUID", _uuid)   # require_uuid's forms
PAGE_SIZE = Int(0, INT32_MAX)
PAGE_TOKEN = Text(pagetoken.MAX_TOKEN, check=_page_token)
BOOL = AnyBool()
NESTED = Nested()
SIZE_GB = Int(0, MAX_SIZE_GB)
DEVICE = Text(MAX_DEVICE_LENGTH, check=_device)
ISCSI_NAME = Text(MAX_ISCSI_NAME, check=_iscsi_name, max_bytes=MAX_ISCSI_NAME)
# a path on a host (a volume file, a block device): bounded well below PATH_MAX
PATH = Text(1024)
PROJECT = Text(64, PROJECT_RE, "a project name")
# what tgtd keeps for a CHAP account and libvirt for a secret: printable
# ASCII without blanks
CHAP = re.compile(r"^[\x21-\x7e]+$")
# short words of the connector (os-brick's platform, os_type)
WORD = Text(64, re.compile(r"^[A-Za-z0-9._-]+$"), "a word of letters, digits, '.', '_', '-'")
HOST = Text(255, re.compile(r"^[A-Za-z0-9._:-]+$"), "a host name")
IP = Text(64, re.compile(r"^[0-9A-Za-z.:%_-]+$"), "an IP address")
PORTAL = Text(262, re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$"), "HOST:PORT")


def _enum(enum) -> Enum:
    return Enum(enum.DESCRIPTOR)


def _rules(message, **fields: Rule) -> dict[str, Rule]:
    name = message.DESCRIPTOR.full_name
    return {f"{name}.{field}": rule for field, rule in fields.items()}


ACCESS_MODE = _enum(types_pb2.AccessMode)

FIELD_RULES: dict[str, Rule] = {
    # -- what requests carry ---------------------------------------------------------------
    **_rules(types_pb2.Connector, ip=IP, host=HOST, initiator=ISCSI_NAME, platform=WORD,
             os_type=WORD, multipath=BOOL),
    **_rules(types_pb2.ConnectionInfo, driver_volume_type=_enum(types_pb2.DriverVolumeType),
             data=NESTED, serial=Text(64, re.compile(r"^[A-Za-z0-9._-]+$"), "a disk serial"),
             multiattach=BOOL),
    **_rules(types_pb2.ConnectionData, target_portal=PORTAL, target_iqn=ISCSI_NAME,
             target_lun=Int(0, 16383), target_discovered=BOOL,
             auth_method=_enum(types_pb2.AuthMethod),
             auth_username=Text(255, CHAP, "printable ASCII without blanks"),
             auth_password=Text(255, CHAP, "printable ASCII without blanks", secret=True),
             access_mode=ACCESS_MODE, encrypted=BOOL,
             qos_specs=Entries(32, key=Text(64, re.compile(r"^[A-Za-z0-9._-]+$"), "a key"),
                               item=Text(255)),
             volume_id=ID, device_path=PATH),
    **_rules(node_pb2.StagedVolume, volume_id=ID,
             driver_volume_type=_enum(types_pb2.DriverVolumeType), device_path=PATH,
             secret_usage=Text(255)),
    # -- vmattach.v1.Controller ------------------------------------------------------------
    **_rules(controller_pb2.CreateVolumeRequest, name=Text(255), size_gb=SIZE_GB,
             multiattach=BOOL),
    **_rules(controller_pb2.GetVolumeRequest, volume_id=ID),
    **_rules(controller_pb2.ListVolumesRequest, page_size=PAGE_SIZE, page_token=PAGE_TOKEN,
             all_projects=BOOL),
    **_rules(controller_pb2.DeleteVolumeRequest, volume_id=ID),
    **_rules(controller_pb2.ReserveVolumeRequest, volume_id=ID, server_id=ID, attachment_id=ID,
             mode=ACCESS_MODE, project_id=PROJECT),
    **_rules(controller_pb2.UnreserveVolumeRequest, volume_id=ID, server_id=ID),
    **_rules(controller_pb2.CreateAttachmentRequest, volume_id=ID, server_id=ID,
             attachment_id=ID, mode=ACCESS_MODE, project_id=PROJECT,
             connector=NESTED),
    **_rules(controller_pb2.DeleteAttachmentRequest, volume_id=ID, server_id=ID),
    **_rules(controller_pb2.ControllerPublishVolumeRequest, volume_id=ID, server_id=ID,
             connector=NESTED),
    **_rules(controller_pb2.ControllerUnpublishVolumeRequest, volume_id=ID, server_id=ID,
             connector=NESTED),
    # a guest device name as the facade recorded it (PostgreSQL keeps 255 characters)
    **_rules(controller_pb2.MarkAttachedRequest, volume_id=ID, server_id=ID,
             mountpoint=Text(255), mode=ACCESS_MODE),
    **_rules(controller_pb2.BeginDetachingRequest, volume_id=ID, server_id=ID),
    **_rules(controller_pb2.RollDetachingRequest, volume_id=ID, server_id=ID),
    **_rules(controller_pb2.MarkDetachedRequest, volume_id=ID, server_id=ID),
    **_rules(controller_pb2.ReconcileExportsRequest, prune=BOOL),
    **_rules(controller_pb2.ExtendVolumeRequest, volume_id=ID, new_size_gb=SIZE_GB),
    # -- vmattach.v1.Node ------------------------------------------------------------------
    **_rules(node_pb2.NodeStageVolumeRequest, volume_id=ID, connection_info=NESTED),
    **_rules(node_pb2.NodeUnstageVolumeRequest, volume_id=ID, connection_info=NESTED),
    **_rules(node_pb2.NodePublishVolumeRequest, server_id=ID, volume_id=ID, device=DEVICE,
             connection_info=NESTED, staged=NESTED, stage=BOOL),
    **_rules(node_pb2.NodeUnpublishVolumeRequest, server_id=ID, volume_id=ID, unstage=BOOL,
             connection_info=NESTED),
    **_rules(node_pb2.NodeExtendVolumeRequest, server_id=ID, volume_id=ID,
             new_size_bytes=Int(0, MAX_SIZE_BYTES), connection_info=NESTED),
    **_rules(node_pb2.NodeWatchServersRequest, after_seq=Int(-INT64_MAX - 1, INT64_MAX),
             wait_seconds=Int(0, 60)),
    # -- vmattach.v1.Servers ---------------------------------------------------------------
    **_rules(servers_pb2.AttachVolumeRequest, server_id=ID, volume_id=ID, device=DEVICE,
             tag=Text(60), delete_on_termination=BOOL, request_id=ID, mode=ACCESS_MODE),
    **_rules(servers_pb2.DetachVolumeRequest, server_id=ID, volume_id=ID),
    **_rules(servers_pb2.GetVolumeAttachmentRequest, server_id=ID, volume_id=ID),
    **_rules(servers_pb2.ListVolumeAttachmentsRequest, server_id=ID, page_size=PAGE_SIZE,
             page_token=PAGE_TOKEN, volume_id=ID),
    **_rules(servers_pb2.ListServersRequest, page_size=PAGE_SIZE, page_token=PAGE_TOKEN,
             all_projects=BOOL),
    **_rules(servers_pb2.GetServerRequest, server_id=ID),
    **_rules(servers_pb2.ServersExtendVolumeRequest, volume_id=ID, new_size_gb=SIZE_GB),
}

SERVICES = (controller_pb2.DESCRIPTOR.services_by_name["Controller"],
            node_pb2.DESCRIPTOR.services_by_name["Node"],
            servers_pb2.DESCRIPTOR.services_by_name["Servers"])


def request_messages() -> list[Descriptor]:
    """Every message a request of the three services can carry (the
    request types and, transitively, their message fields)."""
    seen: dict[str, Descriptor] = {}
    todo = [m.input_type for s in SERVICES for m in s.methods]
    while todo:
        desc = todo.pop()
        if desc.full_name in seen or desc.GetOptions().map_entry:
            continue
        seen[desc.full_name] = desc
        todo.extend(f.message_type for f in desc.fields if f.message_type is not None)
    return list(seen.values())


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


# FIELD_RULES by field descriptor, filled as fields are met (a request's
# fields are looked up without building their full names)
_RULE_OF: dict[FieldDescriptor, Rule | None] = {}


def _rule_of(field: FieldDescriptor) -> Rule | None:
    try:
        return _RULE_OF[field]
    except KeyError:
        rule = _RULE_OF[field] = FIELD_RULES.get(field.full_name)
        return rule


def _violations(msg: Message, path: str, found: list[tuple[str, str, str | None]]) -> None:
    for field, value in msg.ListFields():
        if len(found) >= MAX_VIOLATIONS:
            return
        where = path + field.name
        rule = _rule_of(field)
        if rule is None:  # tests/unit/test_fields.py keeps this from happening
            found.append((where, f"{where} is not accepted", None))
            continue
        try:
            if isinstance(rule, Nested):
                _violations(value, where + ".", found)
            elif isinstance(rule, Entries):
                rule(value, where)
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    for key, item in value.items():
                        if rule.key is not None:
                            rule.key(key, f"{where} key")
                        if rule.item is not None:
                            rule.item(item, f"{where}[{quote(key, 20)}]")
                elif rule.item is not None:
                    for i, item in enumerate(value):
                        rule.item(item, f"{where}[{i}]")
            else:
                rule(value, where)
        except Violation as exc:
            found.append((where, str(exc), exc.reason))


def check(request: Message) -> None:
    """InvalidArgument naming every refused field (at most MAX_VIOLATIONS)
    when a field of a vmattach request breaks its rule."""
    if not request.DESCRIPTOR.full_name.startswith("vmattach.v1."):
        return
    found: list[tuple[str, str, str | None]] = []
    _violations(request, "", found)
    if found:
        raise InvalidArgument("; ".join(d for _, d, _ in found), reason=found[0][2],
                              field=found[0][0], violations=[(f, d) for f, d, _ in found])
