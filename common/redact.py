"""Copies of protobuf messages with their secret fields blanked, for logs.

A field is secret when the .proto marks it [debug_redact = true]."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

REDACTED = "***"


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 dropped FieldDescriptor.label for is_repeated
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _scrub(msg: Message) -> None:
    for field, value in msg.ListFields():
        if field.GetOptions().debug_redact:
            if field.type == FieldDescriptor.TYPE_STRING:
                setattr(msg, field.name, REDACTED)
            else:
                msg.ClearField(field.name)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            if _is_repeated(field):
                for item in value:
                    _scrub(item)
            else:
                _scrub(value)


def secrets_of(msg: Message) -> list[str]:
    """The values of the secret string fields of msg, at any depth (to mask
    them wherever a text might repeat them: an error message, a log line)."""
    found: list[str] = []
    for field, value in msg.ListFields():
        if field.GetOptions().debug_redact:
            if field.type == FieldDescriptor.TYPE_STRING and value:
                found.extend(value if _is_repeated(field) else [value])
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue
            for item in (value if _is_repeated(field) else [value]):
                found.extend(secrets_of(item))
    return found


def redacted(msg: Message) -> Message:
    copy = type(msg)()
    copy.CopyFrom(msg)
    _scrub(copy)
    return copy


def mask(text: str, secrets) -> str:
    """Replace every occurrence of each secret in text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text
