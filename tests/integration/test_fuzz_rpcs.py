"""Property-based requests for every RPC of the three services, generated
from their message descriptors (strings, ints, enums, nested messages,
repeated and map fields, hostile values among them), plus raw random bytes
as the request body of every method, against a real all-in-one server: a
real Controller on a private tgtd, the Node on the fake hypervisor at the
outermost boundary, `--auth token`; callers are the service role, an admin
of one project and a member of another. On SQLite and on PostgreSQL.

Asserted: no UNKNOWN or INTERNAL; no call slower than its deadline; no
secret (the volumes' CHAP passwords, the tokens) in any answer a user gets
or in any log line; health SERVING at the end; every volume's status agrees
with its attachments and its export (ListVolumes, ListExports).

The number of calls and the status codes seen are printed (pytest -s) and
written to fuzz-stats.json in the test's tmp dir."""

from __future__ import annotations

import collections
import json
import logging
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_settings
from tests.support.fake_hypervisor import FakeHypervisor
from vmattach.common import auth, fields
from vmattach.controller.models import Volume
from vmattach.v1 import controller_pb2 as cpb
from vmattach.v1 import controller_pb2_grpc, servers_pb2_grpc, types_pb2
from vmattach.v1 import servers_pb2 as spb

pytestmark = pytest.mark.realstack  # the Controller runs on a real (private) tgtd

PROJECT_A = "fuzzproja"
PROJECT_B = "fuzzprojb"
DEADLINE = 20.0       # every call's deadline
SLACK = 2.0           # what the client may add to it
EXAMPLES = 3000       # generated requests per database
RAW_EXAMPLES = 600    # raw random bodies per database
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

METHODS = [(svc.full_name, m) for svc in fields.SERVICES for m in svc.methods]
HOSTILE = ["", "\x00", "\u00b2", "9" * 40, "a" * 300, "/dev/vdb1", "/dev/vdb", "../../etc/passwd",
           "'; DROP TABLE controller_volume; --", "%s%n%x", "\u202e\u0000", "iqn.", "p1.", "p1.AAAA",
           "\U0001f600" * 70, "iqn.1993-08.org.debian:01:a\nb", " ", "\t\r\n",
           "0" * 36, "00000000-0000-0000-0000-000000000000"]
INT_EDGES = {FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
             FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1)}


class Fuzz:
    """The server, its callers and what the test learns while it runs."""

    def __init__(self, tmp_path, tgtd, serve, database_url: str):
        self.hv = FakeHypervisor()
        self.settings = make_settings(
            tmp_path, auth="token", tgt_portal=tgtd.portal, tgt_control_port=tgtd.control_port,
            node_id="fuzz-node", initiator_iqn="iqn.2004-10.org.vmattach:fuzz-node",
            detach_timeout=0.3, detach_retries=1, reconcile_interval=3600, max_volume_gb=4,
            log_level="DEBUG", node_volume_dirs=str(tmp_path),
            database_url=database_url if database_url.startswith("postgres") else "")
        self.running = serve(self.settings, hypervisor=self.hv)
        self.address = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)])
        tokens = self.running.authenticator.tokens
        self.tokens = {"admin": tokens.create(PROJECT_A, "admin")[0],
                       "member": tokens.create(PROJECT_B, "member")[0]}
        self.service_token = auth.service_token(self.settings.service_token_path())
        self.metadata = {"service": [(auth.SERVICE_HEADER, self.service_token)],
                         "admin": [("authorization", f"Bearer {self.tokens['admin']}")],
                         "member": [("authorization", f"Bearer {self.tokens['member']}")]}
        self.facade = next(s.servicer.f for s in self.running.services if hasattr(s.servicer, "f"))
        self.volumes = next(s.servicer.m for s in self.running.services
                            if s.name == "vmattach.v1.Controller")
        self.codes: collections.Counter[str] = collections.Counter()
        self.raw_codes: collections.Counter[str] = collections.Counter()
        self.user_answers: list[bytes] = []
        self.slowest = (0.0, "")
        self.failures: list[str] = []
        # ids seen in answers, by field name (volume_id, server_id, attachment_id)
        self.ids: dict[str, list[str]] = {"volume_id": [], "server_id": [], "attachment_id": []}
        self.tokens_seen: list[str] = []
        self.chap_seen: list[str] = []
        self.pairs: list[tuple[str, str]] = []  # (volume, server) reserved or attached

    def call(self, service: str, method, request, who: str, raw: bool = False):
        path = f"/{service}/{method.name}"
        if raw:
            rpc = self.channel.unary_unary(path)
        else:
            out = GetMessageClass(method.output_type)
            rpc = self.channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=out.FromString)
        start = time.monotonic()
        code, answer = grpc.StatusCode.OK, b""
        try:
            response = rpc(request, timeout=DEADLINE, metadata=self.metadata[who])
            answer = response if raw else response.SerializeToString()
            if not raw:
                self.learn(response)
        except grpc.RpcError as err:
            code = err.code()
            answer = (err.details() or "").encode() + b"".join(
                v if isinstance(v, bytes) else v.encode() for _, v in (err.trailing_metadata() or ()))
        elapsed = time.monotonic() - start
        (self.raw_codes if raw else self.codes)[code.name] += 1
        if elapsed > self.slowest[0]:
            self.slowest = (elapsed, path)
        if code in FORBIDDEN:
            self.failures.append(f"{path} as {who}: {code.name}: {answer[:300]!r} request {request!s:.300}")
        if elapsed > DEADLINE + SLACK:
            self.failures.append(f"{path} took {elapsed:.1f}s")
        if who != "service":
            self.user_answers.append(answer)

    def learn(self, response) -> None:
        """Ids and page tokens of answers feed later requests."""
        for f, value in response.ListFields():
            if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated:
                pool = self.ids.get(f.name)
                if pool is not None and len(pool) < 100 and value not in pool:
                    pool.append(value)
                elif f.name == "next_page_token" and len(self.tokens_seen) < 50:
                    self.tokens_seen.append(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE and not f.message_type.GetOptions().map_entry:
                for item in (value if f.is_repeated else [value]):
                    self.learn(item)

    def secrets(self) -> list[str]:
        """The CHAP passwords of every volume (now, and those seen before),
        and the tokens."""
        found = [self.service_token, *self.tokens.values(), *self.chap_seen]
        with self.volumes.db.connection_context():
            for volume in Volume.select():
                if volume.chap_secret:
                    found.append(self.volumes.secretbox.decrypt(volume.chap_secret))
        return found


# -- strategies from the descriptors ---------------------------------------------------------

def pick(pool: list[str], default: str = "") -> st.SearchStrategy:
    """One of a pool that grows while the test runs (drawn as an index, so
    that what hypothesis draws does not depend on the pool)."""
    return st.integers(0, 1 << 16).map(lambda i: pool[i % len(pool)] if pool else default)


def string_strategy(fuzz: Fuzz, name: str, sane: bool) -> st.SearchStrategy:
    """Any value (hostile ones included), or with sane a plausible one only
    (so that requests also get past the checks into the services)."""
    plausible: list[st.SearchStrategy] = []
    if not sane:
        plausible += [st.sampled_from(HOSTILE), st.text(max_size=40),
                      st.integers(1, 4).map(lambda n: "x" * (n << 15))]  # 32-128 KiB
    if name.endswith("_id") or name == "serial":
        pool = fuzz.ids.get(name, fuzz.ids["volume_id"])
        plausible.append(pick(pool, "00000000-0000-4000-8000-000000000000"))
        plausible.append(st.uuids().map(str))
    if name == "device" or name == "mountpoint":
        plausible.append(st.sampled_from(["/dev/vdb", "/dev/vdc", "/dev/sdb", "/dev/vdz", "/dev/xvdb"]))
    if name in ("initiator", "target_iqn"):
        plausible.append(st.from_regex(r"\Aiqn\.20[0-2][0-9]-0[1-9]\.org\.[a-z]{1,8}:[a-z0-9.-]{1,20}\Z"))
        plausible.append(st.just("iqn.2004-10.org.vmattach:fuzz-node"))
    if name == "page_token":
        plausible.append(pick(fuzz.tokens_seen))
    if name == "target_portal":
        plausible.append(st.just(fuzz.settings.tgt_portal))
    if name == "device_path":
        plausible.append(st.just(str(fuzz.settings.state_dir) + "/volumes/x.img"))
    if not plausible:
        plausible.append(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=12))
    return st.one_of(*plausible)


def int_strategy(field: FieldDescriptor, sane: bool) -> st.SearchStrategy:
    lo, hi = INT_EDGES.get(field.type, (0, (1 << 32) - 1))
    if field.name == "wait_seconds":  # a long poll: kept short
        return st.integers(0, 1) if sane else st.one_of(st.integers(0, 1), st.sampled_from([-1, 61, lo, hi]))
    if sane:
        return st.integers(0, 3)
    return st.one_of(st.integers(-3, 30), st.sampled_from([lo, hi, -1, 0, 1, 1 << 20, 16383, 16384]))


def field_strategy(fuzz: Fuzz, field: FieldDescriptor, depth: int, sane: bool) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return st.dictionaries(field_strategy(fuzz, key, depth + 1, sane),
                                   field_strategy(fuzz, value, depth + 1, sane), max_size=4 if sane else 40)
        one = message_strategy(fuzz, field.message_type, depth + 1, sane)
    elif field.type == FieldDescriptor.TYPE_STRING:
        one = string_strategy(fuzz, field.name, sane)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        one = st.binary(max_size=64)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        one = st.booleans()
    elif field.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        one = st.sampled_from(numbers) if sane else \
            st.one_of(st.sampled_from(numbers), st.sampled_from([-1, 99, (1 << 31) - 1]))
    else:
        one = int_strategy(field, sane)
    return st.lists(one, max_size=5) if field.is_repeated else one


_STRATEGIES: dict[tuple[int, str, int, bool], st.SearchStrategy] = {}


def message_strategy(fuzz: Fuzz, desc, depth: int = 0, sane: bool = False) -> st.SearchStrategy:
    """Messages of desc built from its fields' strategies (each field set or
    not), recursively; with sane, plausible values only."""
    key = (id(fuzz), desc.full_name, depth, sane)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _message_strategy(fuzz, desc, depth, sane)
    return _STRATEGIES[key]


def _message_strategy(fuzz: Fuzz, desc, depth: int, sane: bool) -> st.SearchStrategy:
    cls = GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    optional = {f.name: field_strategy(fuzz, f, depth, sane) for f in desc.fields}

    def build(values: dict):
        msg = cls()
        for name, value in values.items():
            f = desc.fields_by_name[name]
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                getattr(msg, name).update(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                if f.is_repeated:
                    getattr(msg, name).extend(value)
                else:
                    getattr(msg, name).CopyFrom(value)
            elif f.is_repeated:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=optional).map(build)


def scalar_paths(desc, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """The paths to every single string or integer field of a message, its
    single nested messages included."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for f in desc.fields:
        if f.is_repeated or depth > 3:
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            paths += [(f, *rest) for rest in scalar_paths(f.message_type, depth + 1)]
        elif f.type in (FieldDescriptor.TYPE_STRING, *INT_EDGES):
            paths.append((f,))
    return paths


def hostile_value(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(HOSTILE), st.integers(1, 4).map(lambda n: "x" * (n << 15)))
    lo, hi = INT_EDGES[field.type]
    return st.sampled_from([lo, hi, -1, 1 << 20])


def set_path(msg, path: tuple[FieldDescriptor, ...], value) -> None:
    for f in path[:-1]:
        msg = getattr(msg, f.name)
    setattr(msg, path[-1].name, value)


def callers_of(service: str, method) -> list[str]:
    rule = auth.rule_of(f"/{service}/{method.name}")
    # internal RPCs: mostly the service role, sometimes a user (who is refused)
    return ["service", "service", "service", "admin"] if rule.audience == "internal" else \
        ["admin", "member"]


# -- the invariants ----------------------------------------------------------------------------

def check_invariants(fuzz: Fuzz) -> list[str]:
    meta = fuzz.metadata["service"]
    ctl = controller_pb2_grpc.ControllerStub(fuzz.channel)
    broken: list[str] = []
    volumes, token = [], ""
    while True:
        page = ctl.ListVolumes(cpb.ListVolumesRequest(page_token=token, page_size=100), timeout=DEADLINE,
                               metadata=meta)
        volumes.extend(page.volumes)
        token = page.next_page_token
        if not token:
            break
    exports = ctl.ListExports(cpb.ListExportsRequest(), timeout=DEADLINE, metadata=meta)
    by_volume = {e.volume_id: e for e in exports.exports}
    for v in volumes:
        states = [a.attach_status for a in v.attachments]
        ok = {
            types_pb2.VOLUME_STATUS_AVAILABLE: not states and v.attach_status == types_pb2.ATTACH_STATUS_DETACHED,
            types_pb2.VOLUME_STATUS_IN_USE: types_pb2.ATTACH_STATUS_ATTACHED in states,
            types_pb2.VOLUME_STATUS_ATTACHING: bool(states),
            types_pb2.VOLUME_STATUS_DETACHING: types_pb2.ATTACH_STATUS_DETACHING in states,
        }.get(v.status, False)
        if not ok:
            broken.append(f"volume {v.volume_id}: status {v.status} with attachments {states}")
        published = {a.connector.initiator for a in v.attachments if a.HasField("connector")}
        export = by_volume.get(v.volume_id)
        if published and (export is None or not export.at_tgtd
                          or not published <= set(export.allowed_initiators)):
            broken.append(f"volume {v.volume_id}: published to {published} but export {export}")
    for e in exports.exports:
        if not e.at_tgtd:
            broken.append(f"export of {e.volume_id} missing at tgtd")
    if exports.stray_targets:
        broken.append(f"stray targets {list(exports.stray_targets)}")
    # (the facade's rows are not compared: the fuzzer, as the service role,
    # may end a Controller attachment behind the facade's back, as the audit
    # would report)
    return broken


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a line that cannot be formatted is still a line
            self.lines.append(str(record.msg))


@pytest.fixture
def fuzz(tmp_path, tgtd, serve, database_url):
    f = Fuzz(tmp_path, tgtd, serve, database_url)
    yield f
    f.channel.close()


def test_generated_and_random_requests_to_every_rpc(fuzz, tmp_path):
    lines = Lines()
    root = logging.getLogger()
    root.addHandler(lines)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        run(fuzz)
    finally:
        root.removeHandler(lines)
        root.setLevel(old_level)

    health = health_pb2_grpc.HealthStub(fuzz.channel)
    for service in ("", "vmattach.v1.Controller", "vmattach.v1.Node", "vmattach.v1.Servers"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING, service
    broken = check_invariants(fuzz)
    secrets = [s for s in fuzz.secrets() if s]
    leaked_answers = [s[:4] + "..." for s in secrets if any(s.encode() in a for a in fuzz.user_answers)]
    leaked_lines = [s[:4] + "..." for s in secrets if any(s in line for line in lines.lines)]

    stats = {"database": "postgresql" if fuzz.settings.database_url else "sqlite",
             "generated_calls": sum(fuzz.codes.values()), "raw_calls": sum(fuzz.raw_codes.values()),
             "codes": dict(fuzz.codes.most_common()), "raw_codes": dict(fuzz.raw_codes.most_common()),
             "slowest_s": round(fuzz.slowest[0], 3), "slowest_rpc": fuzz.slowest[1],
             "log_lines": len(lines.lines), "secrets_checked": len(secrets)}
    (tmp_path / "fuzz-stats.json").write_text(json.dumps(stats, indent=2))
    print(f"\nfuzz stats: {json.dumps(stats)}")

    assert fuzz.failures == []
    assert broken == []
    assert leaked_answers == [] and leaked_lines == []
    assert len(secrets) >= 4  # the tokens and at least one volume's CHAP password were looked for
    assert sum(fuzz.codes.values()) >= EXAMPLES and sum(fuzz.raw_codes.values()) >= RAW_EXAMPLES


def seed(fuzz: Fuzz) -> None:
    """Servers of both projects, volumes, and one real attachment (an export
    with a CHAP secret that must never leak)."""
    for project in (PROJECT_A, PROJECT_A, PROJECT_B):
        fuzz.ids["server_id"].append(fuzz.hv.add_domain(project_id=project).uuid)
    fuzz.facade.nodes.refresh()
    ctl = controller_pb2_grpc.ControllerStub(fuzz.channel)
    servers = servers_pb2_grpc.ServersStub(fuzz.channel)
    for i, who in enumerate(["admin", "admin", "member"]):
        v = ctl.CreateVolume(cpb.CreateVolumeRequest(name=f"fuzz-{i}", size_gb=1), timeout=DEADLINE,
                             metadata=fuzz.metadata[who])
        fuzz.ids["volume_id"].append(v.volume_id)
    vols, srvs = fuzz.ids["volume_id"], fuzz.ids["server_id"]
    servers.AttachVolume(spb.AttachVolumeRequest(server_id=srvs[0], volume_id=vols[0]),
                         timeout=DEADLINE, metadata=fuzz.metadata["admin"])
    ctl.ReserveVolume(cpb.ReserveVolumeRequest(volume_id=vols[1], server_id=srvs[1]), timeout=DEADLINE,
                      metadata=fuzz.metadata["service"])
    fuzz.pairs += [(vols[0], srvs[0]), (vols[1], srvs[1])]
    fuzz.chap_seen += fuzz.secrets()[3:]
    assert fuzz.chap_seen, "the attached volume has a CHAP password to look for"


def run(fuzz: Fuzz) -> None:
    seed(fuzz)
    common = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=False)

    @common
    @given(data=st.data())
    def generated(data):
        service, method = data.draw(st.sampled_from(METHODS), label="method")
        # any values; plausible ones only; or plausible ones but one hostile field
        mode = data.draw(st.sampled_from(["any", "sane", "one-bad"]), label="mode")
        request = data.draw(message_strategy(fuzz, method.input_type, sane=mode != "any"), label="request")
        fields_ = method.input_type.fields_by_name
        if mode != "any" and "volume_id" in fields_ and "server_id" in fields_ \
                and data.draw(st.booleans(), label="known pair"):
            request.volume_id, request.server_id = data.draw(st.sampled_from(fuzz.pairs), label="pair")
        paths = scalar_paths(method.input_type)
        if mode == "one-bad" and paths:
            path = data.draw(st.sampled_from(paths), label="field")
            set_path(request, path, data.draw(hostile_value(path[-1]), label="value"))
        who = data.draw(st.sampled_from(callers_of(service, method)), label="caller")
        fuzz.call(service, method, request, who)

    @settings(common, max_examples=RAW_EXAMPLES)
    @given(target=st.sampled_from(METHODS), body=st.binary(max_size=512),
           who=st.sampled_from(["service", "admin", "member"]))
    def raw(target, body, who):
        fuzz.call(target[0], target[1], body, who, raw=True)

    generated()
    raw()
