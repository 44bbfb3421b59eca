"""tgtd's control socket, spoken directly: the requests `tgtadm` would send,
without starting a process for each one (a tgtadm command costs about 2 ms
here, most of it the process start; the same request on the socket about
0.3 ms).

TgtdSocketRunner is a command runner (common/runner.py) that answers the
tgtadm commands TgtAdm builds itself and hands every other command to the
runner it wraps, so TgtAdm, its fakes and its tests see one interface. Its
answers are what tgtadm would print: the daemon's text on stdout, or exit
status 22 and `tgtadm: <reason>` on stderr.

The wire format (tgt 1.0.x, the Debian package): a 120-byte request header
(mode, op, lld, total length, tid, sid, lun, cid, host_no, device_type,
ac_dir, pack, force; little-endian, no padding), then the parameters
as `key=value,key=value` and a NUL; the answer is an 8-byte header (error
code, total length) and the daemon's text. tgtd answers only root."""

from __future__ import annotations

import codecs
import contextlib
import logging
import socket
import struct
from collections.abc import Iterator, Sequence
from errno import EINVAL
from functools import partial

from vmattach.common.errors import BackendError
from vmattach.common.runner import CommandError, CommandRunner, Result, shown
from vmattach.common.turns import answer_of

LOG = logging.getLogger(__name__)

SOCKET_DIR = "/var/run/tgtd"
_REQUEST = struct.Struct("<II64sIiQQIIIIII")
_ANSWER = struct.Struct("<II")
_NO_LUN = 2**64 - 1  # tgtadm's "no --lun"
_MAX_ANSWER = 1 << 34  # a length beyond this is not tgtd talking

# what TgtAdm asks for, and nothing else: tgtd 1.0.85 exits on a parameter it
# does not know, so no other option is ever sent
MODES = {"system": 0, "target": 1, "logicalunit": 2, "account": 7}
OPS = {"new": 0, "delete": 1, "show": 2, "bind": 3, "unbind": 4}
HEADER = ("--control-port", "--lld", "--mode", "--op", "--tid", "--lun")
# the options that become parameters, by the name tgtd knows them
PARAMS = {"--targetname": "targetname", "--backing-store": "path", "--user": "user",
          "--password": "password", "--initiator-name": "initiator-name"}
# tgtd's error codes (tgt 1.0.85, each one seen answered), as tgtadm words them
REASONS = ("success", "unknown error", "out of memory", "can't find the driver",
           "can't find the target", "can't find the logical unit", "can't find the session",
           "can't find the connection", "can't find the binding", "this target already exists",
           "this logical unit number already exists", "this binding already exists",
           "this access control rule already exists", "this access control rule does not exist",
           "this account already exists", "can't find the account", "too many accounts",
           "invalid request")


class Request:
    """One tgtadm command line as tgtd's request: the socket it goes to and its bytes."""

    def __init__(self, argv: Sequence[str], socket_dir: str):
        if not argv or argv[0] != "tgtadm":
            raise ValueError("not a tgtadm command")
        fields = {"--control-port": "0", "--lld": ""}
        force = False
        params: list[str] = []
        words = list(argv[1:])
        while words:
            option = words.pop(0)
            if option == "--force":
                force = True
                continue
            if not words or option not in (*HEADER, *PARAMS):
                raise BackendError(f"tgtd socket: unsupported tgtadm argument {option!r}")
            value = words.pop(0)
            if option in PARAMS:
                if "," in value or "\0" in value:
                    raise BackendError(f"tgtd socket: {option} may not hold ',' or NUL")
                params.append(f"{PARAMS[option]}={value}")
            else:
                fields[option] = value
        body = ",".join(params).encode() + b"\0" if params else b""
        try:
            mode, op = MODES[fields["--mode"]], OPS[fields["--op"]]
            tid = int(fields.get("--tid", "-1"))
            lun = int(fields["--lun"]) if "--lun" in fields else _NO_LUN
            port = int(fields["--control-port"])
            self.data = _REQUEST.pack(mode, op, fields["--lld"].encode(),
                                      _REQUEST.size + len(body), tid, 0, lun, 0, 0, 0, 0, 0,
                                      int(force)) + body
        except (KeyError, ValueError, struct.error) as exc:
            raise BackendError(f"tgtd socket: unsupported tgtadm command ({exc})") from None
        self.path = f"{socket_dir}/socket.{port}"


class TgtdSocketRunner:
    """A command runner whose tgtadm commands go to tgtd's control socket
    (socket_dir/socket.CONTROL_PORT); any other command runs on `commands`."""

    # a request costs a fraction of a process start and tgtd answers one at a
    # time: side by side, a target's requests would only add thread hand-offs
    overlap = False

    def __init__(self, commands: CommandRunner, socket_dir: str = SOCKET_DIR):
        self.commands = commands
        self.socket_dir = socket_dir
        self.timeout = commands.timeout

    def run(self, argv: Sequence[str], *, secrets: Sequence[str] = (),
            check: bool = True, timeout: float | None = None,
            input: str | None = None) -> Result:  # noqa: A002 - the runner's name
        if not argv or argv[0] != "tgtadm":
            return self.commands.run(argv, secrets=secrets, check=check, timeout=timeout,
                                     input=input)
        with self._answer(argv, secrets, timeout) as (err, chunks):
            text = b"".join(chunks).decode(errors="replace")
        result = Result(0, text, "") if err == 0 else _refused(err)
        if check and result.returncode != 0:
            raise CommandError(argv, result, secrets)
        return result

    @contextlib.contextmanager
    def lines(self, argv: Sequence[str], *, timeout: float | None = None
              ) -> Iterator[Iterator[str]]:
        """tgtd's answer a line at a time as it arrives (a listing of a cell's
        targets is never held whole); a refused request raises CommandError."""
        if not argv or argv[0] != "tgtadm":
            with self.commands.lines(argv, timeout=timeout) as lines:
                yield lines
            return
        with self._answer(argv, (), timeout) as (err, chunks):
            if err != 0:
                raise CommandError(argv, _refused(err))
            yield _split_lines(chunks)

    @contextlib.contextmanager
    def _answer(self, argv: Sequence[str], secrets: Sequence[str], timeout: float | None):
        """Send argv's request; yield tgtd's error code and its text, in chunks
        as they arrive (the closing NUL left out)."""
        request = Request(argv, self.socket_dir)
        LOG.debug("tgtd socket: %s", shown(argv, secrets))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout or self.timeout)
            try:
                sock.connect(request.path)
                sock.sendall(request.data)
                err, length = _ANSWER.unpack(answer_of(sock, partial(_read_exactly, sock, _ANSWER.size)))
            except TimeoutError:
                raise _timed_out(argv, secrets) from None
            except OSError as exc:
                raise BackendError(f"cannot reach tgtd at {request.path}: {exc.strerror or exc}"
                                   ) from None
            if not _ANSWER.size <= length <= _MAX_ANSWER:
                raise BackendError(f"tgtd at {request.path} answered a length of {length}")
            yield err, _chunks(sock, length - _ANSWER.size, argv, secrets)


def _refused(err: int) -> Result:
    """What tgtadm answers when tgtd refused its request."""
    reason = REASONS[err] if 0 <= err < len(REASONS) else f"tgtd error {err}"
    return Result(EINVAL, "", f"tgtadm: {reason}\n")


def _timed_out(argv: Sequence[str], secrets: Sequence[str]) -> BackendError:
    return BackendError(f"tgtd did not answer in time: {shown(argv, secrets)}",
                        reason="COMMAND_TIMEOUT")


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("tgtd closed the connection")
        data += chunk
    return data


def _chunks(sock: socket.socket, left: int, argv, secrets) -> Iterator[bytes]:
    while left > 0:
        try:
            chunk = answer_of(sock, partial(sock.recv, min(left, 1 << 16)))
        except TimeoutError:
            raise _timed_out(argv, secrets) from None
        except OSError as exc:
            raise BackendError(f"tgtd's answer broke off: {exc.strerror or exc}") from None
        if not chunk:
            raise BackendError("tgtd closed the connection before the end of its answer")
        left -= len(chunk)
        end = chunk.find(b"\0")
        if end >= 0:  # the text ends at its NUL
            yield chunk[:end]
            return
        yield chunk


def _split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    rest = ""
    for chunk in chunks:
        rest += decoder.decode(chunk)
        *complete, rest = rest.split("\n")
        yield from complete
    rest += decoder.decode(b"", final=True)
    if rest:
        yield rest
