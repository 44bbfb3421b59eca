"""How the CLI prints what it got: records in a fixed field order, and the
formats of python-openstackclient (-f table|json|yaml|value|csv, -c COLUMN).

A record is a dict whose keys are the message's fields in the order the
.proto declares them, with enums as vmattach's words ("in-use", "rw"),
booleans as booleans and timestamps as RFC 3339 text."""

from __future__ import annotations

import csv
import io
import json
import shutil
import textwrap
from collections.abc import Sequence
from typing import Any

from vmattach.common.enums import codec_for

FORMATS = ("table", "json", "yaml", "value", "csv")
MIN_COLUMN = 6


class UsageError(Exception):
    """The command line asked for something that cannot be (exit status 2)."""


def record(msg) -> dict[str, Any]:
    """The message as a record: every field, in declaration order."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = dict(sorted(value.items()))
        elif fd.is_repeated:
            out[fd.name] = [_scalar(fd, v) for v in value]
        else:
            out[fd.name] = _scalar(fd, value, present=(msg.HasField(fd.name)
                                                       if fd.message_type is not None else True))
    return out


def _scalar(fd, value, present: bool = True) -> Any:
    if fd.enum_type is not None:
        codec = codec_for(fd.enum_type.full_name)
        if codec is not None:
            return codec.name(value)
        return fd.enum_type.values_by_number[value].name if value in fd.enum_type.values_by_number \
            else value
    if fd.message_type is not None:
        if fd.message_type.full_name == "google.protobuf.Timestamp":
            return value.ToJsonString() if present and (value.seconds or value.nanos) else ""
        return record(value) if present else None
    return value


def text(value: Any) -> str:
    """One value as a table, value or csv cell."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={text(v)}" for k, v in value.items() if v not in ("", None, [], {}))
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "\n".join(text(v) for v in value)
        return ", ".join(text(v) for v in value)
    return str(value)


def select(columns: Sequence[str], wanted: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The -c choice (in the order given), checked against the fields."""
    if not wanted:
        return list(columns)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise UsageError(f"no column {', '.join(map(repr, unknown))}; the columns are: "
                         + ", ".join(available))
    return list(dict.fromkeys(wanted))


def terminal_width(stream) -> int:
    """The width to fit a table in: the terminal's, or 0 (no limit) when the
    output is not a terminal."""
    try:
        if stream.isatty():
            return shutil.get_terminal_size().columns
    except (AttributeError, ValueError):
        pass
    return 0


def _fit(widths: list[int], floors: list[int], limit: int) -> list[int]:
    """Shrink the widest columns until the table (borders included) fits."""
    widths = list(widths)
    def total() -> int:
        return sum(widths) + 3 * len(widths) + 1
    while limit and total() > limit:
        i = max(range(len(widths)), key=lambda k: widths[k] - floors[k])
        if widths[i] <= floors[i]:
            break
        widths[i] -= 1
    return widths


def _wrap(cell: str, width: int) -> list[str]:
    lines: list[str] = []
    for part in cell.split("\n") or [""]:
        lines += textwrap.wrap(part, width, break_long_words=True, break_on_hyphens=False,
                               replace_whitespace=False, drop_whitespace=True) or [""]
    return lines


def table(headers: list[str], rows: list[list[str]], limit: int = 0) -> str:
    natural = [max([len(h)] + [len(line) for r in rows for line in r[i].split("\n")])
               for i, h in enumerate(headers)]
    floors = [min(n, max(MIN_COLUMN, len(h))) for n, h in zip(natural, headers, strict=True)]
    widths = _fit(natural, floors, limit)
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def lines(cells: list[str]) -> list[str]:
        wrapped = [_wrap(c, w) for c, w in zip(cells, widths, strict=True)]
        height = max(len(w) for w in wrapped)
        return ["| " + " | ".join((w[k] if k < len(w) else "").ljust(width)
                                  for w, width in zip(wrapped, widths, strict=True)) + " |"
                for k in range(height)]

    out = [rule, *lines(headers), rule]
    for r in rows:
        out += lines(r)
    if rows:
        out.append(rule)
    return "\n".join(out)


def _yaml(data: Any) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          width=10_000).rstrip("\n")


def _csv(headers: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writerow(headers)
    for r in rows:
        writer.writerow([v if isinstance(v, (int, float)) and not isinstance(v, bool) else text(v)
                         for v in r])
    return buf.getvalue().rstrip("\n")


def render_list(records: list[dict], columns: list[str], fmt: str, width: int = 0) -> str:
    """A listing: one row per record, the given columns in that order."""
    picked = [{c: r.get(c) for c in columns} for r in records]
    if fmt == "json":
        return json.dumps(picked, indent=2)
    if fmt == "yaml":
        return _yaml(picked) if picked else "[]"
    if fmt == "value":
        return "\n".join(" ".join(text(r[c]) for c in columns) for r in picked)
    if fmt == "csv":
        return _csv(columns, [[r[c] for c in columns] for r in picked])
    return table(columns, [[text(r[c]) for c in columns] for r in picked], width)


def render_one(rec: dict, columns: list[str], fmt: str, width: int = 0) -> str:
    """One record: field and value, in the given order."""
    picked = {c: rec.get(c) for c in columns}
    if fmt == "json":
        return json.dumps(picked, indent=2)
    if fmt == "yaml":
        return _yaml(picked)
    if fmt == "value":
        return "\n".join(text(v) for v in picked.values())
    if fmt == "csv":
        return _csv(columns, [[picked[c] for c in columns]])
    return table(["field", "value"], [[c, text(v)] for c, v in picked.items()], width)
