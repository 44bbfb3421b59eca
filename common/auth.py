"""Who is calling, and what they may do (docs/security.md).

Two kinds of caller:
- the service role: vmattach's own processes (the facade calling the
  Controller and the Nodes), known by a client certificate of the service
  kind (vmattach pki init) or, without TLS, by the service token of the
  process's state directory, sent as `x-vmattach-service-token` metadata;
- users, known by `authorization: Bearer TOKEN` metadata: a token made by
  `vmattach token create`, which belongs to one project with one role
  (reader < member < admin).

POLICY says, for every RPC, whether it is open (health), public (users with
at least a role) or internal (the service role only). The server interceptor
(common/grpcutil.py) authenticates each call with Authenticator and puts the
Caller in a context variable; the plain Python managers read it with
current() to keep each project to its own volumes and servers."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import peewee

from vmattach.common import tls
from vmattach.common.db import Prepared, utcnow, with_connection
from vmattach.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from vmattach.common.migrations import Schema
from vmattach.common.rules import PROJECT_RE

LOG = logging.getLogger(__name__)

ROLES = ("reader", "member", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
SERVICE_HEADER = "x-vmattach-service-token"
TOKEN_PREFIX = "vmat"
_TOKEN_RE = re.compile(r"^vmat\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")


# -- the caller ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    """kind: "service" (vmattach's own processes), "user" (a token), or
    "system" (this process's own background work, or --auth none)."""
    kind: str
    subject: str
    project: str = ""
    role: str = ""

    @property
    def privileged(self) -> bool:
        return self.kind in ("service", "system")

    @property
    def admin(self) -> bool:
        return self.privileged or self.role == "admin"

    def seen_project(self) -> str | None:
        """The one project whose objects exist for this caller: None for an
        admin (every project), "" for a caller of no project (none)."""
        return None if self.admin else self.project

    def sees(self, project_id: str | None) -> bool:
        """Whether an object of project_id exists for this caller. Objects of
        no project (servers without Nova's owner metadata) only for admins."""
        seen = self.seen_project()
        return seen is None or (bool(seen) and project_id == seen)

    def list_scope(self, all_projects: bool = False) -> str | None:
        """The project a list shows; None: every project (privileged callers,
        and admins who ask for all_projects)."""
        if self.privileged or (all_projects and self.admin):
            return None
        return self.project

    def describe(self) -> str:
        """For the audit trail: never a secret."""
        if self.kind == "user":
            return f"project={self.project} role={self.role} {self.subject}"
        return f"{self.kind} {self.subject}"


SYSTEM = Caller("system", "system")
AUTH_NONE = Caller("system", "auth-none")
ANONYMOUS = Caller("anonymous", "anonymous")
_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("vmattach_caller", default=SYSTEM)


def current() -> Caller:
    """The caller of the request this thread is serving (SYSTEM outside one)."""
    return _current.get()


def acting_as(caller: Caller) -> contextvars.Token:
    return _current.set(caller)


def done_acting(token: contextvars.Token) -> None:
    _current.reset(token)


# -- the policy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    audience: str          # "open", "public" or "internal"
    role: str = "reader"   # the least role of a user on a public RPC
    changes: bool = False  # a state-changing call: one audit line


def _rules(service: str, audience: str, reads: tuple[str, ...], changes: tuple[str, ...],
           role: str = "member") -> dict[str, Rule]:
    table = {f"/vmattach.v1.{service}/{m}": Rule(audience, "reader") for m in reads}
    table.update({f"/vmattach.v1.{service}/{m}": Rule(audience, role, True) for m in changes})
    return table


POLICY: dict[str, Rule] = {
    "/grpc.health.v1.Health/Check": Rule("open"),
    **_rules("Controller", "public", ("GetVolume", "ListVolumes"),
             ("CreateVolume", "DeleteVolume", "ExtendVolume")),
    **_rules("Controller", "internal", ("ListExports",),
             ("ReconcileExports", "ReserveVolume", "UnreserveVolume", "ControllerPublishVolume",
              "ControllerUnpublishVolume", "MarkAttached", "BeginDetaching", "RollDetaching",
              "MarkDetached", "CreateAttachment", "DeleteAttachment")),
    **_rules("Node", "internal", ("NodeGetInfo", "ListServers", "ListSecrets",
                                  "NodeWatchServers"),
             ("NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume",
              "NodeUnpublishVolume", "NodeExtendVolume")),
    **_rules("Servers", "public",
             ("GetVolumeAttachment", "ListVolumeAttachments", "ListServers", "GetServer"),
             ("AttachVolume", "DetachVolume", "ExtendVolume")),
    # the hypervisor hosts' addresses and health: for operators
    "/vmattach.v1.Servers/ListNodes": Rule("public", "admin"),
}
# an RPC missing from the table is for the service role only
DEFAULT_RULE = Rule("internal", "admin", True)


def rule_of(method: str) -> Rule:
    return POLICY.get(method, DEFAULT_RULE)


# -- user tokens --------------------------------------------------------------------------

class AuthToken(peewee.Model):
    """A user token: only the SHA-256 of its secret part is kept."""
    id = peewee.CharField(primary_key=True, max_length=16)
    secret_hash = peewee.CharField(max_length=64)
    project = peewee.CharField(max_length=64, index=True)
    role = peewee.CharField(max_length=16)
    description = peewee.CharField(max_length=255, default="")
    created_at = peewee.DateTimeField(default=utcnow)
    revoked_at = peewee.DateTimeField(null=True)

    class Meta:
        database = None
        table_name = "auth_token"


MODELS = [AuthToken]
# schema versions (common/migrations.py); every table change adds a Migration
SCHEMA = Schema("auth", MODELS, [])
_TOKEN = Prepared(lambda i: AuthToken.select().where(AuthToken.id == i), 1)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_project(project: str) -> str:
    if not PROJECT_RE.fullmatch(project or ""):
        raise InvalidArgument("a project is 1-64 letters, digits, '_', '.' or '-'")
    return project


class TokenStore:
    def __init__(self, db: peewee.Database):
        self.db = db

    @with_connection
    def create(self, project: str, role: str = "member", description: str = "") -> tuple[str, AuthToken]:
        """A new token: (the text to give the user, shown once; its row)."""
        check_project(project)
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}")
        if len(description) > 255 or not description.isprintable():
            raise InvalidArgument("description: at most 255 printable characters")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        row = AuthToken.create(id=token_id, secret_hash=_digest(secret), project=project,
                               role=role, description=description)
        return f"{TOKEN_PREFIX}.{token_id}.{secret}", row

    @with_connection
    def list(self) -> list[AuthToken]:
        return list(AuthToken.select().order_by(AuthToken.created_at, AuthToken.id))

    @with_connection
    def revoke(self, token_id: str) -> AuthToken:
        changed = (AuthToken.update(revoked_at=utcnow())
                   .where((AuthToken.id == token_id) & AuthToken.revoked_at.is_null()).execute())
        row = AuthToken.get_or_none(AuthToken.id == token_id)
        if row is None:
            raise NotFound(f"token {token_id[:40]} could not be found", reason="TOKEN_NOT_FOUND")
        if not changed:
            LOG.info("token %s was already revoked", token_id)
        return row

    @with_connection
    def verify(self, header: str) -> Caller:
        """The user of an `authorization` value; Unauthenticated when it is
        not a valid, unrevoked token (the same answer whatever is wrong).
        Looked up on every call: a revoked token is refused at once."""
        scheme, _, text = header.strip().partition(" ")
        m = _TOKEN_RE.match(text.strip()) if scheme.lower() == "bearer" else None
        row = _TOKEN.first(m.group(1)) if m else None
        if (m is None or row is None or row.revoked_at is not None
                or not hmac.compare_digest(row.secret_hash, _digest(m.group(2)))):
            raise Unauthenticated("the token is not valid", reason="INVALID_TOKEN")
        return Caller("user", f"token={row.id}", row.project, row.role)


# -- the service token --------------------------------------------------------------------

def service_token(path: str | os.PathLike) -> str:
    """The service token in path, generated (0600) when the file is absent."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    for _ in range(100):  # another process may be writing it right now
        text = path.read_text().strip()
        if text:
            return text
    raise InvalidArgument(f"the service token file {path} is empty")


# -- authenticating one call --------------------------------------------------------------

class Authenticator:
    """mode "token": the checks above; mode "none": every call is allowed
    (only on loopback, see common/tls.check_listen)."""

    def __init__(self, mode: str = "token", tokens: TokenStore | None = None,
                 service_secret: str = ""):
        self.mode = mode
        self.tokens = tokens
        self.service_secret = service_secret

    def authenticate(self, method: str, context) -> Caller:
        rule = rule_of(method)
        if self.mode == "none":
            return AUTH_NONE
        if rule.audience == "open":
            return ANONYMOUS
        metadata = dict(context.invocation_metadata() or ())
        caller = self._service(context, metadata)
        name = method.rsplit("/", 1)[-1]
        if rule.audience == "internal":
            if caller is None:
                raise PermissionDenied(f"{name} is for vmattach's own services only",
                                       reason="SERVICE_ONLY")
            return caller
        if caller is not None:
            return caller
        header = metadata.get("authorization")
        if not header:
            raise Unauthenticated("this call needs 'authorization: Bearer TOKEN' metadata",
                                  reason="NO_TOKEN")
        if self.tokens is None:
            raise Unauthenticated("this process accepts no user tokens", reason="INVALID_TOKEN")
        user = self.tokens.verify(str(header)[:512])
        if _RANK[user.role] < _RANK[rule.role]:
            denied = PermissionDenied(f"role {user.role} may not call {name}",
                                      reason="ROLE_NOT_ALLOWED")
            denied.caller = user  # for the audit line
            raise denied
        return user

    def _service(self, context, metadata: dict) -> Caller | None:
        peer = tls.peer_certificate(context)
        if peer is not None and peer[0] == "service":
            return Caller("service", f"cert={peer[1]}")
        given = metadata.get(SERVICE_HEADER)
        if given and self.service_secret and hmac.compare_digest(
                str(given).encode(), self.service_secret.encode()):
            return Caller("service", "service-token")
        return None
