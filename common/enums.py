"""The contract's enums and the words vmattach keeps inside: the one place
that maps between them.

The databases, the domain XML and the Python logic keep Cinder's and
libvirt's words ("in-use", "rw", "iscsi", "virtio"); the API carries enums
(VOLUME_STATUS_IN_USE, ACCESS_MODE_READ_WRITE, ...). Servicers and clients
convert at their boundary with the codecs below, nowhere else."""

from __future__ import annotations

from vmattach.common.errors import InvalidArgument
from vmattach.v1 import types_pb2


class EnumCodec:
    """One enum of the contract <-> its internal words.

    `words` maps each internal word to the enum value's name without the
    enum's prefix; every value but _UNSPECIFIED has exactly one word."""

    def __init__(self, enum, field: str, words: dict[str, str], reason: str | None = None):
        self.enum = enum
        self.field = field
        self.reason = reason
        prefix = enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
        self._to_pb = {word: enum.Value(prefix + suffix) for word, suffix in words.items()}
        self._to_word = {number: word for word, number in self._to_pb.items()}
        missing = [v.name for v in enum.DESCRIPTOR.values if v.number and v.number not in self._to_word]
        if missing:
            raise RuntimeError(f"{enum.DESCRIPTOR.name}: no internal word for {missing}")

    @property
    def words(self) -> list[str]:
        return list(self._to_pb)

    def to_pb(self, word: str | None) -> int:
        """The enum value of an internal word; _UNSPECIFIED for one the
        contract does not know (never an exception on the way out)."""
        return self._to_pb.get(word or "", 0)

    def to_word(self, number: int, default: str | None = None) -> str:
        """The internal word of an enum value received from a caller.
        _UNSPECIFIED gives `default`; without one, or for a number this
        version does not know, InvalidArgument."""
        if number == 0 and default is not None:
            return default
        word = self._to_word.get(number)
        if word is None:
            raise InvalidArgument(f"{self.field} must be one of "
                                  + ", ".join(self.enum.Name(n) for n in self._to_word),
                                  reason=self.reason)
        return word

    def name(self, number: int) -> str:
        """The internal word for display (the CLI); "" for _UNSPECIFIED and
        the enum value's name or number for one this version does not know."""
        if number in self._to_word:
            return self._to_word[number]
        if number == 0:
            return ""
        try:
            return self.enum.Name(number)
        except ValueError:
            return str(number)


VOLUME_STATUS = EnumCodec(types_pb2.VolumeStatus, "status", {
    "creating": "CREATING", "available": "AVAILABLE", "attaching": "ATTACHING",
    "in-use": "IN_USE", "detaching": "DETACHING", "deleting": "DELETING", "error": "ERROR",
    "error_attaching": "ERROR_ATTACHING"})
ATTACH_STATUS = EnumCodec(types_pb2.AttachStatus, "attach_status", {
    "detached": "DETACHED", "reserved": "RESERVED", "attaching": "ATTACHING",
    "attached": "ATTACHED", "detaching": "DETACHING", "error_attaching": "ERROR_ATTACHING"})
ATTACHMENT_STATE = EnumCodec(types_pb2.AttachmentState, "state", {
    "attaching": "ATTACHING", "attached": "ATTACHED", "detaching": "DETACHING"})
ACCESS_MODE = EnumCodec(types_pb2.AccessMode, "mode", {"rw": "READ_WRITE", "ro": "READ_ONLY"},
                        reason="INVALID_MODE")
DRIVER_VOLUME_TYPE = EnumCodec(types_pb2.DriverVolumeType, "driver_volume_type", {
    "iscsi": "ISCSI", "file": "FILE"})
AUTH_METHOD = EnumCodec(types_pb2.AuthMethod, "auth_method", {"": "NONE", "CHAP": "CHAP"})
BUS = EnumCodec(types_pb2.Bus, "bus", {
    "virtio": "VIRTIO", "scsi": "SCSI", "ide": "IDE", "sata": "SATA", "usb": "USB", "xen": "XEN",
    "fdc": "FDC", "sd": "SD"})
SERVER_STATE = EnumCodec(types_pb2.ServerState, "state", {
    "nostate": "NOSTATE", "running": "RUNNING", "blocked": "BLOCKED", "paused": "PAUSED",
    "shutdown": "SHUTDOWN", "shutoff": "SHUTOFF", "crashed": "CRASHED",
    "pmsuspended": "PMSUSPENDED"})

_BY_ENUM = {c.enum.DESCRIPTOR.full_name: c for c in (
    VOLUME_STATUS, ATTACH_STATUS, ATTACHMENT_STATE, ACCESS_MODE, DRIVER_VOLUME_TYPE, AUTH_METHOD,
    BUS, SERVER_STATE)}


def codec_for(enum_full_name: str) -> EnumCodec | None:
    """The codec of an enum of the contract, by its full name."""
    return _BY_ENUM.get(enum_full_name)


def _walk(data: dict, descriptor, convert) -> dict:
    for fd in descriptor.fields:
        if fd.name not in data:
            continue
        if fd.enum_type is not None and fd.enum_type.full_name in _BY_ENUM:
            codec = _BY_ENUM[fd.enum_type.full_name]
            data[fd.name] = convert(codec, data[fd.name])
        elif fd.message_type is not None:
            value = data[fd.name]
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    _walk(item, fd.message_type, convert)
    return data


def dict_to_words(data: dict, descriptor) -> dict:
    """A MessageToDict(preserving_proto_field_name=True) dict with the enum
    names replaced by the internal words (what vmattach stores), in place."""
    return _walk(data, descriptor, lambda c, v: c.name(c.enum.Value(v)) if isinstance(v, str) else v)


def dict_from_words(data: dict, descriptor) -> dict:
    """The inverse of dict_to_words, for json_format.ParseDict; also takes
    enum names (what dict_to_words keeps for a value it has no word for)."""
    def convert(codec, v):
        if isinstance(v, str) and v not in codec.enum.keys():
            return codec.enum.Name(codec.to_pb(v))
        return v
    return _walk(data, descriptor, convert)
