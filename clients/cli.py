"""The `vmattach` command: `serve` starts services; the other commands talk
to a running vmattach (address from --address or VMATTACH_ADDRESS).

Exit status: 0 done; 1 vmattach said no (its message and reason on stderr);
2 the command line is wrong; 3 vmattach could not be reached."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from vmattach.clients.output import FORMATS, UsageError, record, render_list, render_one, select, terminal_width
from vmattach.common import config
from vmattach.common.errors import NotFound, Unavailable, VmattachError
from vmattach.common.version import version

DEFAULT_ADDRESS = "127.0.0.1:50051"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CONNECT_TIMEOUT = 10.0
ADDRESS_HINT = ("Set the address with --address HOST:PORT or VMATTACH_ADDRESS (and"
                " --controller-address / VMATTACH_CONTROLLER_ADDRESS for a separate Controller);"
                " a vmattach with TLS also needs --tls-ca, --tls-cert and --tls-key.")
PROGRESS_INTERVAL = 0.5

# The columns a listing shows unless -c picks others (show prints every field).
VOLUME_COLUMNS = ["volume_id", "name", "size_gb", "status", "attach_status", "multiattach"]
SERVER_COLUMNS = ["server_id", "name", "state", "node_id", "device_prefix"]
NODE_COLUMNS = ["node_id", "address", "reachable", "servers", "attachments", "last_seen"]
ATTACHMENT_COLUMNS = ["attachment_id", "server_id", "volume_id", "device", "mode", "tag", "state"]


class Ambiguous(VmattachError):
    """A name that more than one volume or server has."""

    reason = "AMBIGUOUS_NAME"


# -- output ---------------------------------------------------------------------------------


def _format(args) -> str:
    return "json" if getattr(args, "json", False) and not getattr(args, "format", None) \
        else (getattr(args, "format", None) or "table")


def _width(args) -> int:
    if getattr(args, "max_width", None):
        return args.max_width
    return terminal_width(sys.stdout)


def print_list(args, messages: Iterable, columns: list[str], descriptor) -> None:
    names = [f.name for f in descriptor.fields]
    cols = select(columns, args.column, names)
    print(render_list([record(m) for m in messages], cols, _format(args), _width(args)))


def print_one(args, message) -> None:
    names = [f.name for f in message.DESCRIPTOR.fields]
    cols = select(names, args.column, names)
    print(render_one(record(message), cols, _format(args), _width(args)))


# -- names or ids ---------------------------------------------------------------------------


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _by_name(kind: str, ref: str, everything: Callable[[], Iterable],
             id_of: Callable[[Any], str]) -> Any:
    """The one volume or server named ref."""
    matches = [m for m in everything() if m.name == ref]
    if not matches:
        raise NotFound(f"No {kind} with a name or ID of '{ref}' exists.",
                       reason=f"{kind.upper()}_NOT_FOUND")
    if len(matches) > 1:
        raise Ambiguous(f"More than one {kind} exists with the name '{ref}': "
                        + ", ".join(sorted(id_of(m) for m in matches))
                        + f". Use the {kind}'s ID.")
    return matches[0]


# A UUID is taken as an ID as it is (vmattach answers for an unknown one with
# its own message); anything else is looked up by name.

def volume_ref(c, ref: str) -> str:
    return ref if _is_uuid(ref) else _by_name("volume", ref, c.list_volumes,
                                                lambda v: v.volume_id).volume_id


def find_volume(c, ref: str):
    return c.get_volume(ref) if _is_uuid(ref) else _by_name("volume", ref, c.list_volumes,
                                                             lambda v: v.volume_id)


def server_ref(c, ref: str) -> str:
    return ref if _is_uuid(ref) else _by_name("server", ref, c.list_servers,
                                                lambda s: s.server_id).server_id


def find_server(c, ref: str):
    return c.get_server(ref) if _is_uuid(ref) else _by_name("server", ref, c.list_servers,
                                                             lambda s: s.server_id)


# -- progress -------------------------------------------------------------------------------


def with_progress(what: str, work: Callable[[], Any], poll: Callable[[], str]) -> Any:
    """Run work(); on a terminal (stderr), show poll()'s answer (the
    attachment's current step) on one line until it ends. Nothing is printed
    when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return work()
    result: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="vmattach-cli-call", daemon=True).start()
    shown = ""
    try:
        while not done.wait(PROGRESS_INTERVAL):
            try:
                step = poll()
            except VmattachError:
                continue
            line = f"{what}: {step}" if step else what
            if line != shown:
                sys.stderr.write("\r\x1b[K" + line[:max(terminal_width(sys.stderr) - 1, 20)])
                sys.stderr.flush()
                shown = line
    finally:
        if shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _extend_step(c, volume_id: str) -> Callable[[], str]:
    """An extend's progress: the size the Controller reports so far."""
    def poll() -> str:
        return f"{c.get_volume(volume_id).size_gb} GiB"
    return poll


def _step_of(c, server_id: str, volume_id: str) -> Callable[[], str]:
    from vmattach.common.enums import ATTACHMENT_STATE

    def poll() -> str:
        att = c.get_attachment(server_id, volume_id)
        state = ATTACHMENT_STATE.name(att.state)
        return f"{state} ({att.progress})" if att.progress else state
    return poll


# -- commands -------------------------------------------------------------------------------


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


def cmd_completion(args) -> int:
    from vmattach.clients.completion import script
    print(script(parser(), args.shell))
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
    if _format(args) == "table":
        print(text)
        print(f"token {row.id}: project {row.project}, role {row.role}."
              " Shown once: only its hash is kept.", file=sys.stderr)
    else:
        rec = {"token": text, "token_id": row.id, "project": row.project, "role": row.role}
        print(render_one(rec, select(list(rec), args.column, list(rec)), _format(args)))
    return 0


TOKEN_COLUMNS = ["token_id", "project", "role", "created_at", "revoked_at", "description"]


def cmd_token_list(args) -> int:
    from vmattach.clients.admin import tokens
    with tokens(config.load(args)) as store:
        rows = [{"token_id": r.id, "project": r.project, "role": r.role,
                 "created_at": r.created_at.isoformat(),
                 "revoked_at": r.revoked_at.isoformat() if r.revoked_at else "",
                 "description": r.description}
                for r in store.list()]
    cols = select(TOKEN_COLUMNS, args.column, TOKEN_COLUMNS)
    print(render_list(rows, cols, _format(args), _width(args)))
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
    print_one(args, c.create_volume(args.name, args.size, args.multiattach))


def cmd_volume_list(args, c):
    from vmattach.v1 import controller_pb2
    print_list(args, c.list_volumes(all_projects=args.all_projects), VOLUME_COLUMNS,
               controller_pb2.Volume.DESCRIPTOR)


def cmd_volume_show(args, c):
    print_one(args, find_volume(c, args.volume))


def cmd_volume_delete(args, c):
    c.delete_volume(volume_ref(c, args.volume))


def cmd_volume_attach(args, c):
    server_id = server_ref(c, args.server)
    volume_id = volume_ref(c, args.volume)
    att = with_progress(
        f"attaching {args.volume} to {args.server}",
        lambda: c.attach_volume(server_id, volume_id, device=args.device or "", tag=args.tag or "",
                                delete_on_termination=args.delete_on_termination,
                                request_id=args.request_id or "", mode=args.mode),
        _step_of(c, server_id, volume_id))
    print_one(args, att)


def cmd_volume_extend(args, c):
    from vmattach.v1 import servers_pb2
    volume_id = volume_ref(c, args.volume)
    done = with_progress(f"extending {args.volume} to {args.size} GiB",
                         lambda: c.extend_volume(volume_id, args.size), _extend_step(c, volume_id))
    cols = select(["size_gb", "server_ids"], args.column,
                  [f.name for f in servers_pb2.ServersExtendVolumeResponse.DESCRIPTOR.fields])
    print(render_one(record(done), cols, _format(args), _width(args)))


def cmd_volume_detach(args, c):
    server_id = server_ref(c, args.server)
    volume_id = volume_ref(c, args.volume)
    with_progress(f"detaching {args.volume} from {args.server}",
                  lambda: c.detach_volume(server_id, volume_id), _step_of(c, server_id, volume_id))


def cmd_server_list(args, c):
    from vmattach.v1 import types_pb2
    print_list(args, c.list_servers(all_projects=args.all_projects), SERVER_COLUMNS,
               types_pb2.Server.DESCRIPTOR)


def cmd_server_show(args, c):
    print_one(args, find_server(c, args.server))


def cmd_node_list(args, c):
    from vmattach.v1 import servers_pb2
    print_list(args, c.list_nodes(), NODE_COLUMNS, servers_pb2.NodeStatus.DESCRIPTOR)


def cmd_attachment_list(args, c):
    from vmattach.v1 import servers_pb2
    if bool(args.server) == bool(args.volume):
        raise UsageError("give a SERVER or --volume VOLUME")
    if args.server:
        rows = c.list_attachments(server_ref(c, args.server))
    else:
        rows = c.list_attachments(volume_id=volume_ref(c, args.volume))
    print_list(args, rows, ATTACHMENT_COLUMNS, servers_pb2.VolumeAttachment.DESCRIPTOR)


def cmd_attachment_show(args, c):
    server_id = server_ref(c, args.server)
    volume_id = volume_ref(c, args.volume)
    print_one(args, c.get_attachment(server_id, volume_id))


# -- the command line -----------------------------------------------------------------------


def _connection_options(sub_level: bool) -> argparse.ArgumentParser:
    """Options every command that talks to vmattach takes, before or after
    the command's name. Given after it, they win."""
    p = argparse.ArgumentParser(add_help=False)

    def default(value):
        return argparse.SUPPRESS if sub_level else value
    p.add_argument("--address", default=default(os.environ.get("VMATTACH_ADDRESS", DEFAULT_ADDRESS)),
                   metavar="HOST:PORT", help="where vmattach listens (env VMATTACH_ADDRESS;"
                   f" default {DEFAULT_ADDRESS})")
    p.add_argument("--controller-address", metavar="HOST:PORT",
                   default=default(os.environ.get("VMATTACH_CONTROLLER_ADDRESS")),
                   help="the Controller when not at --address (env VMATTACH_CONTROLLER_ADDRESS)")
    p.add_argument("--token", default=default(os.environ.get("VMATTACH_TOKEN")),
                   help="user token from `vmattach token create` (env VMATTACH_TOKEN)")
    for name, what in (("tls-ca", "CA that signed the server's certificate"),
                       ("tls-cert", "client certificate (e.g. client.crt of vmattach pki init)"),
                       ("tls-key", "key of the client certificate")):
        env = "VMATTACH_" + name.upper().replace("-", "_")
        p.add_argument("--" + name, default=default(os.environ.get(env)), metavar="FILE",
                       help=f"{what} (env {env})")
    p.add_argument("--timeout", type=float, default=default(120.0), metavar="SECONDS",
                   help="seconds per call (default 120)")
    p.add_argument("--connect-timeout", type=float, metavar="SECONDS",
                   default=default(os.environ.get("VMATTACH_CONNECT_TIMEOUT", str(CONNECT_TIMEOUT))),
                   help="seconds to wait for a connection, e.g. to a server started a moment"
                   f" ago; 0: no wait (env VMATTACH_CONNECT_TIMEOUT; default {CONNECT_TIMEOUT:g},"
                   " as grpcurl)")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="the same as -f json")
    return p


def _output_options(columns_hint: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output formatters")
    g.add_argument("-f", "--format", choices=FORMATS, help="output format (default table)")
    g.add_argument("-c", "--column", action="append", metavar="COLUMN",
                   help=f"show this column (repeat for more); {columns_hint}")
    g.add_argument("--max-width", type=int, default=0, metavar="N",
                   help="fit a table in N characters (default: the terminal's width)")
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmattach", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                parents=[_connection_options(False)])
    p.add_argument("--version", action="version", version=f"vmattach {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_options(True)
    listing = _output_options("default: the usual ones")
    showing = _output_options("default: every field")

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

    db = sub.add_parser("db", help="the services' databases").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    d = db.add_parser("upgrade", help="bring the databases of --services to this version's"
                                      " schema (serve does it at start unless --db-upgrade false)")
    config.add_arguments(d)
    d.set_defaults(func=cmd_db_upgrade, local=True)

    comp = sub.add_parser("completion", help="print the shell completion script",
                          description="Print the completion script for bash or zsh. Load it with"
                                      " `source <(vmattach completion bash)` (bash) or"
                                      " `source <(vmattach completion zsh)` (zsh).")
    comp.add_argument("shell", choices=["bash", "zsh"])
    comp.set_defaults(func=cmd_completion, local=True)

    pki = sub.add_parser("pki", help="certificates for TLS").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    k = pki.add_parser("init", help="create a CA, service.crt/.key and client.crt/.key in DIR")
    k.add_argument("directory", metavar="DIR")
    k.add_argument("--hosts", required=True,
                   help="comma-separated names and addresses the services are reached at")
    k.set_defaults(func=cmd_pki_init, local=True)

    token = sub.add_parser("token", help="user tokens (in the state directory's database)"
                           ).add_subparsers(dest="action", required=True, metavar="ACTION")
    t = token.add_parser("create", help="create a token; prints it once", parents=[showing])
    config.add_arguments(t)
    t.add_argument("--project", required=True)
    t.add_argument("--role", choices=["reader", "member", "admin"], default="member")
    t.add_argument("--description", default="")
    t.set_defaults(func=cmd_token_create, local=True)
    t = token.add_parser("list", help="list tokens (never their secret)", parents=[listing])
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

    volume = sub.add_parser("volume", help="volumes and their attachment").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    v = volume.add_parser("create", help="create a volume", parents=[conn, showing])
    v.add_argument("name")
    v.add_argument("--size", type=int, required=True, help="size in GiB")
    v.add_argument("--multiattach", action="store_true")
    v.set_defaults(func=cmd_volume_create)
    v = volume.add_parser("list", help="list volumes", parents=[conn, listing])
    v.add_argument("--all-projects", action="store_true", help="admins: every project's")
    v.set_defaults(func=cmd_volume_list)
    v = volume.add_parser("show", help="show a volume", parents=[conn, showing])
    v.add_argument("volume", help="name or ID")
    v.set_defaults(func=cmd_volume_show)
    v = volume.add_parser("delete", help="delete a volume", parents=[conn])
    v.add_argument("volume", help="name or ID")
    v.set_defaults(func=cmd_volume_delete)
    v = volume.add_parser("attach", help="attach a volume to a server", parents=[conn, showing])
    v.add_argument("server", help="name or ID")
    v.add_argument("volume", help="name or ID")
    v.add_argument("--device", help="e.g. /dev/vdc (default: the next free name)")
    v.add_argument("--tag")
    v.add_argument("--delete-on-termination", action="store_true")
    v.add_argument("--request-id", help="a UUID that makes a retry return the same attachment")
    v.add_argument("--mode", choices=["rw", "ro"], default="rw",
                   help="ro: the guest can read the disk and not write it")
    v.set_defaults(func=cmd_volume_attach)
    v = volume.add_parser("extend", help="grow a volume, also while attached", parents=[conn, showing])
    v.add_argument("volume", help="name or ID")
    v.add_argument("--size", type=int, required=True, help="the new size in GiB")
    v.set_defaults(func=cmd_volume_extend)
    v = volume.add_parser("detach", help="detach a volume from a server", parents=[conn])
    v.add_argument("server", help="name or ID")
    v.add_argument("volume", help="name or ID")
    v.set_defaults(func=cmd_volume_detach)

    server = sub.add_parser("server", help="servers (virtual machines)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    s = server.add_parser("list", help="list servers", parents=[conn, listing])
    s.add_argument("--all-projects", action="store_true", help="admins: every project's")
    s.set_defaults(func=cmd_server_list)
    s = server.add_parser("show", help="show a server", parents=[conn, showing])
    s.add_argument("server", help="name or ID")
    s.set_defaults(func=cmd_server_show)

    node = sub.add_parser("node", help="hypervisor hosts (nodes)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    n = node.add_parser("list", help="list the facade's nodes: reachable, servers, attachments, last seen",
                        parents=[conn, listing])
    n.set_defaults(func=cmd_node_list)

    attachment = sub.add_parser("attachment", help="volume attachments").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    a = attachment.add_parser("list", help="list a server's (or a volume's) attachments",
                              parents=[conn, listing])
    a.add_argument("server", nargs="?", help="name or ID")
    a.add_argument("--volume", help="name or ID: this volume's attachments (all its servers)")
    a.set_defaults(func=cmd_attachment_list)
    a = attachment.add_parser("show", help="show one attachment", parents=[conn, showing])
    a.add_argument("server", help="name or ID")
    a.add_argument("volume", help="name or ID")
    a.set_defaults(func=cmd_attachment_show)
    return p


def _unreachable(exc: VmattachError, args) -> list[str]:
    """The addresses nothing answers at, when the call failed UNAVAILABLE
    (vmattach itself also answers UNAVAILABLE when one of its nodes is down)."""
    if not isinstance(exc, Unavailable):
        return []
    import socket
    down = []
    for address in dict.fromkeys(filter(None, (args.address, args.controller_address))):
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or "/" in host:
            continue  # a target this check does not understand (unix:, dns:///...)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        except OSError:
            down.append(address)
    return down


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if getattr(args, "local", False):
            return args.func(args)
        with _client(args) as client:
            client.wait_connected(args.connect_timeout)
            args.func(args, client)
        return EXIT_OK
    except UsageError as exc:
        p.print_usage(sys.stderr)
        print(f"vmattach: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except VmattachError as exc:
        if getattr(args, "local", False) and isinstance(exc, Unavailable):
            # audit, db upgrade...: the addresses are their settings' (the
            # message names the one that failed), not --address
            print(f"vmattach: {exc.message} (reason {exc.reason})", file=sys.stderr)
            return EXIT_UNREACHABLE
        if exc.reason == "UNREACHABLE":  # no connection (TCP, or the TLS handshake)
            print(f"vmattach: {exc.message}\n{ADDRESS_HINT}", file=sys.stderr)
            return EXIT_UNREACHABLE
        down = _unreachable(exc, args)
        if down:
            print(f"vmattach: could not reach vmattach at {', '.join(down)}: {exc.message}\n"
                  f"{ADDRESS_HINT}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"vmattach: {exc.message} (reason {exc.reason})", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:
        # `vmattach volume list | head`: the reader has gone; nothing more to say
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
