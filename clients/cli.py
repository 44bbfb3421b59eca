"""The `vmattach` command: `serve` starts services; the other commands talk
to a running vmattach (address from --address or VMATTACH_ADDRESS)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from google.protobuf.json_format import MessageToDict

from vmattach.common import config
from vmattach.common.errors import VmattachError

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _show(args, items, columns: list[str]) -> None:
    rows = [_dict(m) for m in items]
    if args.json:
        print(json.dumps(rows if args.many else rows[0], indent=2, sort_keys=True))
    elif args.many:
        print(_table(rows, columns))
    else:
        width = max(len(k) for k in rows[0])
        for key, value in rows[0].items():
            shown = json.dumps(value) if isinstance(value, (dict, list)) else value
            print(f"{key.ljust(width)}  {shown}")


VOLUME_COLUMNS = ["volume_id", "name", "size_gb", "status", "attach_status", "multiattach"]
SERVER_COLUMNS = ["server_id", "name", "state", "node_id", "device_prefix"]
ATTACHMENT_COLUMNS = ["attachment_id", "server_id", "volume_id", "device", "tag", "state"]


def _client(args):
    from vmattach.clients.client import VmattachClient
    return VmattachClient(args.address, args.controller_address or None, timeout=args.timeout)


def cmd_serve(args) -> int:
    from vmattach.server.app import serve
    return serve(config.load(args))


def cmd_audit(args) -> int:
    from vmattach.server.audit import run
    return run(config.load(args), args.repair)


def cmd_volume_create(args, c):
    args.many = False
    _show(args, [c.create_volume(args.name, args.size, args.multiattach)], VOLUME_COLUMNS)


def cmd_volume_list(args, c):
    args.many = True
    _show(args, list(c.list_volumes()), VOLUME_COLUMNS)


def cmd_volume_show(args, c):
    args.many = False
    _show(args, [c.get_volume(args.volume)], VOLUME_COLUMNS)


def cmd_volume_delete(args, c):
    c.delete_volume(args.volume)


def cmd_volume_attach(args, c):
    args.many = False
    _show(args, [c.attach_volume(args.server, args.volume, device=args.device or "",
                                 tag=args.tag or "",
                                 delete_on_termination=args.delete_on_termination,
                                 request_id=args.request_id or "")], ATTACHMENT_COLUMNS)


def cmd_volume_detach(args, c):
    c.detach_volume(args.server, args.volume)


def cmd_server_list(args, c):
    args.many = True
    _show(args, list(c.list_servers()), SERVER_COLUMNS)


def cmd_server_show(args, c):
    args.many = False
    _show(args, [c.get_server(args.server)], SERVER_COLUMNS)


def cmd_attachment_list(args, c):
    args.many = True
    _show(args, list(c.list_attachments(args.server)), ATTACHMENT_COLUMNS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmattach", description=__doc__)
    p.add_argument("--address", default=os.environ.get("VMATTACH_ADDRESS", DEFAULT_ADDRESS),
                   help="HOST:PORT of vmattach (env VMATTACH_ADDRESS)")
    p.add_argument("--controller-address", default=os.environ.get("VMATTACH_CONTROLLER_ADDRESS"),
                   help="HOST:PORT of the Controller when not at --address"
                        " (env VMATTACH_CONTROLLER_ADDRESS)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start vmattach services")
    config.add_arguments(serve)
    serve.set_defaults(func=cmd_serve, local=True)

    audit = sub.add_parser("audit", help="compare the facade, the Controller, tgtd and libvirt;"
                                         " exit 1 on any divergence")
    config.add_arguments(audit)
    audit.add_argument("--repair", action="store_true", help="fix what can be fixed")
    audit.set_defaults(func=cmd_audit, local=True)

    volume = sub.add_parser("volume", help="volumes and their attachment").add_subparsers(
        dest="action", required=True)
    v = volume.add_parser("create", help="create a volume")
    v.add_argument("name")
    v.add_argument("--size", type=int, required=True, help="size in GiB")
    v.add_argument("--multiattach", action="store_true")
    v.set_defaults(func=cmd_volume_create)
    v = volume.add_parser("list", help="list volumes")
    v.set_defaults(func=cmd_volume_list)
    v = volume.add_parser("show", help="show a volume")
    v.add_argument("volume")
    v.set_defaults(func=cmd_volume_show)
    v = volume.add_parser("delete", help="delete a volume")
    v.add_argument("volume")
    v.set_defaults(func=cmd_volume_delete)
    v = volume.add_parser("attach", help="attach a volume to a server")
    v.add_argument("server")
    v.add_argument("volume")
    v.add_argument("--device", help="e.g. /dev/vdc (default: the next free name)")
    v.add_argument("--tag")
    v.add_argument("--delete-on-termination", action="store_true")
    v.add_argument("--request-id", help="a UUID that makes a retry return the same attachment")
    v.set_defaults(func=cmd_volume_attach)
    v = volume.add_parser("detach", help="detach a volume from a server")
    v.add_argument("server")
    v.add_argument("volume")
    v.set_defaults(func=cmd_volume_detach)

    server = sub.add_parser("server", help="servers (virtual machines)").add_subparsers(
        dest="action", required=True)
    s = server.add_parser("list", help="list servers")
    s.set_defaults(func=cmd_server_list)
    s = server.add_parser("show", help="show a server")
    s.add_argument("server")
    s.set_defaults(func=cmd_server_show)

    attachment = sub.add_parser("attachment", help="volume attachments").add_subparsers(
        dest="action", required=True)
    a = attachment.add_parser("list", help="list a server's attachments")
    a.add_argument("server")
    a.set_defaults(func=cmd_attachment_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if getattr(args, "local", False):
            return args.func(args)
        with _client(args) as client:
            args.func(args, client)
        return 0
    except VmattachError as exc:
        print(f"ERROR ({type(exc).__name__}, {exc.reason}): {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
