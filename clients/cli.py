"""The `vmattach` command: `serve` starts services; the other commands talk
to a running vmattach (address from --address or VMATTACH_ADDRESS)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from google.protobuf.json_format import MessageToDict

from vmattach.common import config
from vmattach.common.enums import dict_to_words
from vmattach.common.errors import VmattachError
from vmattach.common.version import version

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _dict(msg) -> dict:
    return dict_to_words(MessageToDict(msg, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), msg.DESCRIPTOR)


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
NODE_COLUMNS = ["node_id", "address", "reachable", "servers", "attachments", "last_seen"]
ATTACHMENT_COLUMNS = ["attachment_id", "server_id", "volume_id", "device", "mode", "tag", "state"]


def _client(args):
    from vmattach.clients.client import VmattachClient
    from vmattach.common.tls import TlsFiles
    tls = TlsFiles(args.tls_cert or "", args.tls_key or "", args.tls_ca or "")
    return VmattachClient(args.address, args.controller_address or None, timeout=args.timeout,
                          token=args.token or "", tls=tls if tls.enabled or tls.ca else None)


def cmd_serve(args) -> int:
    from vmattach.clients.serve import serve
    return serve(config.load(args))


def cmd_audit(args) -> int:
    from vmattach.server.audit import run
    return run(config.load(args), args.repair, args.metrics_file)


def cmd_db_upgrade(args) -> int:
    from vmattach.clients.serve import upgrade_databases
    for component, found, now in upgrade_databases(config.load(args)):
        before = "new" if found is None else f"version {found}"
        print(f"{component}: {before} -> version {now}")
    return 0


def cmd_pki_init(args) -> int:
    from vmattach.clients.admin import pki_init
    for path in pki_init(args.directory, args.hosts):
        print(path)
    return 0


def cmd_token_create(args) -> int:
    from vmattach.clients.admin import tokens
    with tokens(config.load(args)) as store:
        text, row = store.create(args.project, args.role, args.description or "")
    if args.json:
        print(json.dumps({"token": text, "token_id": row.id, "project": row.project,
                          "role": row.role}, indent=2, sort_keys=True))
    else:
        print(text)
        print(f"token {row.id}: project {row.project}, role {row.role}."
              " Shown once: only its hash is kept.", file=sys.stderr)
    return 0


def cmd_token_list(args) -> int:
    from vmattach.clients.admin import tokens
    with tokens(config.load(args)) as store:
        rows = [{"token_id": r.id, "project": r.project, "role": r.role,
                 "description": r.description, "created_at": r.created_at.isoformat(),
                 "revoked_at": r.revoked_at.isoformat() if r.revoked_at else ""}
                for r in store.list()]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print(_table(rows, ["token_id", "project", "role", "created_at", "revoked_at",
                            "description"]))
    return 0


def cmd_token_revoke(args) -> int:
    from vmattach.clients.admin import tokens
    with tokens(config.load(args)) as store:
        store.revoke(args.token_id)
    return 0


def cmd_rotate_key(args) -> int:
    from vmattach.clients.admin import rotate_key
    done = rotate_key(config.load(args))
    for service, count in done.items():
        print(f"{service}: {count} secret(s) re-encrypted with the new key")
    return 0


def cmd_volume_create(args, c):
    args.many = False
    _show(args, [c.create_volume(args.name, args.size, args.multiattach)], VOLUME_COLUMNS)


def cmd_volume_list(args, c):
    args.many = True
    _show(args, list(c.list_volumes(all_projects=args.all_projects)), VOLUME_COLUMNS)


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
                                 request_id=args.request_id or "",
                                 mode=args.mode)], ATTACHMENT_COLUMNS)


def cmd_volume_extend(args, c):
    args.many = False
    done = c.extend_volume(args.volume, args.size)
    _show(args, [done], ["size_gb", "server_ids"])


def cmd_volume_detach(args, c):
    c.detach_volume(args.server, args.volume)


def cmd_server_list(args, c):
    args.many = True
    _show(args, list(c.list_servers(all_projects=args.all_projects)), SERVER_COLUMNS)


def cmd_server_show(args, c):
    args.many = False
    _show(args, [c.get_server(args.server)], SERVER_COLUMNS)


def cmd_node_list(args, c):
    args.many = True
    _show(args, c.list_nodes(), NODE_COLUMNS)


def cmd_attachment_list(args, c):
    args.many = True
    if bool(args.server) == bool(args.volume):
        raise VmattachError("give a SERVER_ID or --volume VOLUME_ID", reason="INVALID_ARGUMENT")
    _show(args, list(c.list_attachments(args.server or "", volume_id=args.volume or "")),
          ATTACHMENT_COLUMNS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmattach", description=__doc__)
    p.add_argument("--address", default=os.environ.get("VMATTACH_ADDRESS", DEFAULT_ADDRESS),
                   help="HOST:PORT of vmattach (env VMATTACH_ADDRESS)")
    p.add_argument("--controller-address", default=os.environ.get("VMATTACH_CONTROLLER_ADDRESS"),
                   help="HOST:PORT of the Controller when not at --address"
                        " (env VMATTACH_CONTROLLER_ADDRESS)")
    p.add_argument("--token", default=os.environ.get("VMATTACH_TOKEN"),
                   help="user token from `vmattach token create` (env VMATTACH_TOKEN)")
    for name, what in (("tls-ca", "CA that signed the server's certificate"),
                       ("tls-cert", "client certificate (e.g. client.crt of vmattach pki init)"),
                       ("tls-key", "key of the client certificate")):
        env = "VMATTACH_" + name.upper().replace("-", "_")
        p.add_argument("--" + name, default=os.environ.get(env), help=f"{what} (env {env})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--version", action="version", version=f"vmattach {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start vmattach services")
    config.add_arguments(serve)
    serve.set_defaults(func=cmd_serve, local=True)

    audit = sub.add_parser("audit", help="compare the facade, the Controller, tgtd and libvirt;"
                                         " exit 1 on any divergence")
    config.add_arguments(audit)
    audit.add_argument("--repair", action="store_true", help="fix what can be fixed")
    audit.add_argument("--metrics-file", help="also write the divergence count there in"
                                              " Prometheus' text format (node_exporter's"
                                              " textfile collector)")
    audit.set_defaults(func=cmd_audit, local=True)

    pki = sub.add_parser("pki", help="certificates for TLS").add_subparsers(
        dest="action", required=True)
    k = pki.add_parser("init", help="create a CA, service.crt/.key and client.crt/.key in DIR")
    k.add_argument("directory", metavar="DIR")
    k.add_argument("--hosts", required=True,
                   help="comma-separated names and addresses the services are reached at")
    k.set_defaults(func=cmd_pki_init, local=True)

    token = sub.add_parser("token", help="user tokens (in the state directory's database)"
                           ).add_subparsers(dest="action", required=True)
    t = token.add_parser("create", help="create a token; prints it once")
    config.add_arguments(t)
    t.add_argument("--project", required=True)
    t.add_argument("--role", choices=["reader", "member", "admin"], default="member")
    t.add_argument("--description", default="")
    t.set_defaults(func=cmd_token_create, local=True)
    t = token.add_parser("list", help="list tokens (never their secret)")
    config.add_arguments(t)
    t.set_defaults(func=cmd_token_list, local=True)
    t = token.add_parser("revoke", help="revoke a token at once")
    config.add_arguments(t)
    t.add_argument("token_id")
    t.set_defaults(func=cmd_token_revoke, local=True)

    rotate = sub.add_parser("rotate-key", help="add a new secret key and re-encrypt every"
                                               " stored secret with it")
    config.add_arguments(rotate)
    rotate.set_defaults(func=cmd_rotate_key, local=True)

    db = sub.add_parser("db", help="the services' databases").add_subparsers(
        dest="action", required=True)
    d = db.add_parser("upgrade", help="bring the databases of --services to this version's"
                                      " schema (serve does it at start unless --db-upgrade false)")
    config.add_arguments(d)
    d.set_defaults(func=cmd_db_upgrade, local=True)

    volume = sub.add_parser("volume", help="volumes and their attachment").add_subparsers(
        dest="action", required=True)
    v = volume.add_parser("create", help="create a volume")
    v.add_argument("name")
    v.add_argument("--size", type=int, required=True, help="size in GiB")
    v.add_argument("--multiattach", action="store_true")
    v.set_defaults(func=cmd_volume_create)
    v = volume.add_parser("list", help="list volumes")
    v.add_argument("--all-projects", action="store_true", help="admins: every project's")
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
    v.add_argument("--mode", choices=["rw", "ro"], default="rw",
                   help="ro: the guest can read the disk and not write it")
    v.set_defaults(func=cmd_volume_attach)
    v = volume.add_parser("extend", help="grow a volume, also while attached")
    v.add_argument("volume")
    v.add_argument("--size", type=int, required=True, help="the new size in GiB")
    v.set_defaults(func=cmd_volume_extend)
    v = volume.add_parser("detach", help="detach a volume from a server")
    v.add_argument("server")
    v.add_argument("volume")
    v.set_defaults(func=cmd_volume_detach)

    server = sub.add_parser("server", help="servers (virtual machines)").add_subparsers(
        dest="action", required=True)
    s = server.add_parser("list", help="list servers")
    s.add_argument("--all-projects", action="store_true", help="admins: every project's")
    s.set_defaults(func=cmd_server_list)
    s = server.add_parser("show", help="show a server")
    s.add_argument("server")
    s.set_defaults(func=cmd_server_show)

    node = sub.add_parser("node", help="hypervisor hosts (nodes)").add_subparsers(
        dest="action", required=True)
    n = node.add_parser("list", help="list the facade's nodes: reachable, servers,"
                                     " attachments, last seen")
    n.set_defaults(func=cmd_node_list)

    attachment = sub.add_parser("attachment", help="volume attachments").add_subparsers(
        dest="action", required=True)
    a = attachment.add_parser("list", help="list a server's (or a volume's) attachments")
    a.add_argument("server", nargs="?")
    a.add_argument("--volume", help="list this volume's attachments (all its servers)")
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
