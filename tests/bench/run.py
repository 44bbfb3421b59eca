"""`make bench`: every figure of the benchmark issue in one run, on this
machine, printed as one table and written to bench/results.json.

    python -m tests.bench.run [--smoke] [--out FILE]

1. floor         a no-op unary call (health Check) from this process to a
                 tiny server subprocess, both on our gRPC set-up
2. orchestration attach+detach cycles through the facade of the bench
                 server process (tests/bench/server.py: all three services,
                 fake hypervisor, Controller on SQLite and a fake tgtd);
                 the gRPC calls of one attach counted by an interceptor;
                 then the same with the three services apart, a process
                 each (--role), as a deployment runs them
3. real stack    the same through `vmattach serve` on a real tgtd,
                 libvirtd and QEMU (a diskless guest with a SCSI root disk);
                 and its floor, in turns of a run each: the same tgtadm and
                 libvirt operations done directly (tests/bench/real_floor.py),
                 same guest, same tgtd; the ratio is the median of each run's
                 p50 over the floor run's next to it
4. scale         (2) again with the databases pre-filled (tests/bench/prefill.py)
                 and 99 more fake nodes in a farm process (tests/bench/farm.py)

Every figure is the median over several runs. A ratio compares runs made
in turn, side by side in time (in_turns): the median of each run's figure
over the one next to it. See bench/README.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.bench.common import (
    REPO_ROOT,
    Child,
    median,
    percentile,
    server_uuid,
    time_cycles,
    vm_hwm_mb,
)
from tests.bench.prefill import prefill
from tests.support.sql_counter import diff
from vmattach.clients.client import VmattachClient
from vmattach.common.grpcutil import call, channel

FULL = dict(floor_runs=5, floor_calls=2000, count_attaches=10,
            lat_runs=5, lat_cycles=100, tput_runs=3, tput_seconds=3.0, conc=[1, 8, 32],
            warmup=30, domains=64,
            real_runs=5, real_cycles=10,
            realtgt_runs=3, realtgt_cycles=30, sec_runs=5, sec_cycles=100,
            scale_volumes=100_000, scale_nodes=100, scale_per_node=100)
SMOKE = dict(floor_runs=2, floor_calls=100, count_attaches=2,
             lat_runs=2, lat_cycles=5, tput_runs=2, tput_seconds=0.3, conc=[1, 8, 32],
             warmup=3, domains=32,
             real_runs=2, real_cycles=2,
             realtgt_runs=2, realtgt_cycles=3, sec_runs=1, sec_cycles=3,
             scale_volumes=1000, scale_nodes=4, scale_per_node=32)

TARGETS = {
    "orchestration_ratio": ("<=", 1.3),
    "cycles_per_s_32": (">=", 150.0),
    "cycles_32_over_1": (">=", 1.0),
    "apart_cycles_per_s_32": (">=", 150.0),
    "apart_cycles_32_over_1": (">=", 1.0),
    "sql_per_attach": ("<=", 10.0),
    "sql_per_detach": ("<=", 8.0),
    "real_attach_p50_ms": ("<=", 100.0),
    "real_detach_p50_ms": ("<=", 150.0),
    "real_floor_ratio_attach": ("<=", 1.3),
    "real_floor_ratio_detach": ("<=", 1.3),
    "scale_ratio": ("<=", 1.2),
    "peak_rss_mb": ("<=", 200.0),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1. the floor ---------------------------------------------------------------------

class FloorProbe:
    """The floor's server (a child of the run, alive until it ends) and a
    channel to it: block() is one run of no-op calls, their p50 and p99 (ms)."""

    def __init__(self, address: str):
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        self.ch = channel(address)
        self.check = health_pb2_grpc.HealthStub(self.ch).Check
        self.request = health_pb2.HealthCheckRequest(service="")
        for _ in range(200):
            call(self.check, self.request, timeout=10)

    def block(self, calls: int) -> tuple[float, float]:
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call(self.check, self.request, timeout=10)
            samples.append((time.perf_counter() - t0) * 1000)
        return percentile(samples, 50), percentile(samples, 99)


def measure_floor(cfg, probe: FloorProbe) -> dict:
    blocks = [probe.block(cfg["floor_calls"]) for _ in range(cfg["floor_runs"])]
    return {"floor_p50_ms": median([p50 for p50, _ in blocks]),
            "floor_p99_ms": median([p99 for _, p99 in blocks]),
            "floor_runs_p50_ms": [p50 for p50, _ in blocks]}


def in_turns(runs: int, *measures: Callable[[], object]) -> list[list]:
    """Each measure once per round, one after another, for `runs` rounds, so
    that a ratio of two of them compares runs made side by side in time (on
    a shared machine, a run minutes later can be 30 % slower or faster):
    per measure, the list of what its runs gave."""
    got: list[list] = [[] for _ in measures]
    for _ in range(runs):
        for out, measure in zip(got, measures, strict=True):
            out.append(measure())
    return got


def combined(runs: list[dict]) -> dict:
    """Runs of time_cycles (one run each) as one figure: the median of each
    p50 and p99, and every run's p50s."""
    out: dict = {k: median([r[k] for r in runs])
                 for k in ("attach_p50_ms", "attach_p99_ms", "detach_p50_ms", "detach_p99_ms")}
    out["runs_attach_p50_ms"] = [r["attach_p50_ms"] for r in runs]
    out["runs_detach_p50_ms"] = [r["detach_p50_ms"] for r in runs]
    return out


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of each run's figure over the one measured next to it."""
    return median([n / d for n, d in zip(numerators, denominators, strict=True)])


# -- 2. orchestration -----------------------------------------------------------------

def make_pairs(client: VmattachClient, count: int, node: int = 0) -> list[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    return [(server_uuid(node, i), client.create_volume(f"bench-{tag}-{i}", 1).volume_id)
            for i in range(count)]


def cycle(client, server_id, volume_id) -> tuple[float, float]:
    t0 = time.perf_counter()
    client.attach_volume(server_id, volume_id)
    t1 = time.perf_counter()
    client.detach_volume(server_id, volume_id)
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def latency(client, pairs, runs: int, cycles: int, device: str = "") -> dict:
    """c=1: per run the p50/p99 of attach and of detach; the medians over runs."""
    return time_cycles(lambda k: client.attach_volume(*pairs[k % len(pairs)], device=device),
                       lambda k: client.detach_volume(*pairs[k % len(pairs)]), runs, cycles)


def throughput(clients, pairs, concurrency: int, seconds: float) -> float:
    """Cycles per second with `concurrency` callers, each on its own server
    and volume, for about `seconds`."""
    done = [0] * concurrency
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(k):
        client = clients[k % len(clients)]
        s, v = pairs[k]
        start.wait()
        try:
            while time.perf_counter() < deadline[0]:
                client.attach_volume(s, v)
                client.detach_volume(s, v)
                done[k] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(done) / elapsed


def count_calls(cfg, work: Path) -> dict:
    """Run a bench server with the counting interceptor and the SQL counter;
    count the gRPC calls and the SQL statements (all three services, BEGIN
    and COMMIT included) of `count_attaches` attaches and as many detaches."""
    state = work / "count-state"
    counts_file = work / "counts.json"

    def snapshot(srv) -> dict:
        counts_file.unlink(missing_ok=True)
        srv.signal(signal.SIGUSR1)
        for _ in range(200):
            if counts_file.exists():
                return json.loads(counts_file.read_text())
            time.sleep(0.05)
        raise TimeoutError("the bench server did not write its counts")

    with Child("tests.bench.server", ["--state-dir", str(state),
                                      "--domains", str(max(8, cfg["count_attaches"])),
                                      "--count-calls", str(counts_file)],
               work / "count-server.log") as srv:
        with VmattachClient(srv.address, timeout=60) as client:
            pairs = make_pairs(client, cfg["count_attaches"])
            s, v = pairs[0]
            cycle(client, s, v)  # the first request also fills the node directory
            before = snapshot(srv)
            for s, v in pairs:
                client.attach_volume(s, v)
            mid = snapshot(srv)
            for s, v in pairs:
                client.detach_volume(s, v)
            after = snapshot(srv)
    n = len(pairs)
    out: dict = {}
    for what, key in (("grpc", "calls"), ("sql", "sql")):
        attach = diff(mid[what], before[what], n)
        detach = diff(after[what], mid[what], n)
        out.update({f"{key}_per_attach": sum(attach.values()),
                    f"{key}_per_detach": sum(detach.values()),
                    f"attach_{key}_by_kind": attach, f"detach_{key}_by_kind": detach})
    # the keys of before (calls by gRPC method)
    out["attach_calls_by_method"] = out.pop("attach_calls_by_kind")
    out["detach_calls_by_method"] = out.pop("detach_calls_by_kind")
    # how many of them were made in-process (internal_calls)
    out["in_process_calls_per_attach"] = sum(diff(mid["in_process"], before["in_process"], n).values())
    out["in_process_calls_per_detach"] = sum(diff(after["in_process"], mid["in_process"], n).values())
    for key in ("attach", "detach"):
        by_kind = out[f"{key}_sql_by_kind"]
        out[f"sql_per_{key}_without_transaction_control"] = sum(
            v for k, v in by_kind.items() if k not in ("BEGIN", "COMMIT", "ROLLBACK"))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BenchServer:
    """A bench server (tests/bench/server.py) with four clients and one
    server and volume per caller of the highest concurrency, warmed up.
    apart=True: the Node, the Controller and the servers facade in three
    processes (--role), the facade's `controller_address` and `nodes` naming
    the other two, as a deployment runs them; the clients call the facade
    and make their volumes at the Controller."""

    def __init__(self, cfg, work: Path, name: str, server_args: list[str], domains: int,
                 throughput_too: bool, stack: contextlib.ExitStack, apart: bool = False):
        state = work / f"{name}-state"
        t0 = time.monotonic()

        def child(role: str, state_dir: Path, *more: str) -> Child:
            return stack.enter_context(Child(
                "tests.bench.server", ["--state-dir", str(state_dir), "--domains", str(domains),
                                       *server_args, "--role", role, *more],
                work / f"{name}-{role}.log", timeout=300))
        if apart:
            node = child("node", state / "node")
            controller = child("controller", state / "controller")
            self.srv = child("servers", state / "servers", "--controller", controller.address,
                             "--farm", node.address)
            self.processes = [self.srv, controller, node]
        else:
            self.srv = child("all", state)
            self.processes = [self.srv]
        self.start_s = round(time.monotonic() - t0, 2)
        security: dict = {}
        if "--secure" in server_args:
            from vmattach.common.tls import TlsFiles
            certs = state / "pki"
            security = {"token": (state / "bench.token").read_text(),
                        "tls": TlsFiles(str(certs / "client.crt"), str(certs / "client.key"),
                                        str(certs / "ca.crt"))}
        self.clients = [stack.enter_context(VmattachClient(self.srv.address, timeout=120,
                                                           **security)) for _ in range(4)]
        volumes = self.clients[0]
        if apart:
            volumes = stack.enter_context(VmattachClient(controller.address, timeout=120))
        self.pairs = make_pairs(volumes, max(cfg["conc"]) if throughput_too else 4)
        t1 = time.monotonic()
        for k in range(cfg["warmup"]):
            cycle(self.clients[0], *self.pairs[k % len(self.pairs)])
        self.warmup_s = round(time.monotonic() - t1, 2)

    def run(self, cycles: int) -> dict:
        """One latency run at c=1 (time_cycles)."""
        return latency(self.clients[0], self.pairs, 1, cycles)

    def warm(self, cfg, concurrency: int) -> None:
        throughput(self.clients, self.pairs, concurrency, min(1.0, cfg["tput_seconds"]))

    def rate(self, cfg, concurrency: int) -> tuple[float, list[float]]:
        """One throughput run: cycles/s, and each server process's CPU time
        per cycle in it (ms; the facade's first)."""
        before = [cpu_seconds(p.pid) for p in self.processes]
        t0 = time.perf_counter()
        rate = throughput(self.clients, self.pairs, concurrency, cfg["tput_seconds"])
        cycles = rate * (time.perf_counter() - t0)
        return rate, [round((cpu_seconds(p.pid) - b) * 1000 / cycles, 2)
                      for p, b in zip(self.processes, before, strict=True)]

    def figures(self, cfg, latency_runs: list[dict], throughput_too: bool = True,
                rates: dict[int, list[tuple[float, list[float]]]] | None = None) -> dict:
        """The latency runs as one figure, the throughput at each concurrency
        (measured then, unless its runs are given: rates), the peak RSS so
        far and the start-up times."""
        out = combined(latency_runs)
        if throughput_too:
            in_rounds = rates is None  # side_by_side's rates alternate servers, not concurrencies
            if rates is None:
                for c in cfg["conc"]:
                    self.warm(cfg, c)
                # rounds of one run at each concurrency: c=32 / c=1 compares runs
                # made side by side in time, as every ratio of the bench does
                rates = dict(zip(cfg["conc"], in_turns(
                    cfg["tput_runs"], *(lambda c=c: self.rate(cfg, c) for c in cfg["conc"])),
                    strict=True))
            # the median run of each concurrency: its cycles/s and its servers' CPU per cycle
            median_runs = {str(c): sorted(runs)[len(runs) // 2] for c, runs in rates.items()}
            out["cycles_per_s"] = {c: run[0] for c, run in median_runs.items()}
            out["cpu_ms_per_cycle"] = {c: run[1] for c, run in median_runs.items()}
            out["runs_cycles_per_s"] = {str(c): [run[0] for run in runs]
                                        for c, runs in rates.items()}
            if in_rounds and 1 in rates and 32 in rates:
                out["cycles_32_over_1"] = paired_ratio(out["runs_cycles_per_s"]["32"],
                                                       out["runs_cycles_per_s"]["1"])
        out["peak_rss_mb"] = vm_hwm_mb(self.srv.pid)
        out["start_s"] = self.start_s
        out["warmup_s"] = self.warmup_s
        return out


def side_by_side(cfg, a: BenchServer, b: BenchServer, runs: int, cycles: int) -> tuple[dict, dict]:
    """The figures of two bench servers measured in turn: their c=1 runs, then
    at each concurrency their throughput runs."""
    runs_a, runs_b = in_turns(runs, lambda: a.run(cycles), lambda: b.run(cycles))
    rates_a, rates_b = {}, {}
    for c in cfg["conc"]:
        a.warm(cfg, c)
        b.warm(cfg, c)
        rates_a[c], rates_b[c] = in_turns(cfg["tput_runs"], lambda c=c: a.rate(cfg, c),
                                          lambda c=c: b.rate(cfg, c))
    return a.figures(cfg, runs_a, rates=rates_a), b.figures(cfg, runs_b, rates=rates_b)


def orchestration(cfg, work: Path, name: str, server_args: list[str], domains: int,
                  runs: int, cycles: int) -> dict:
    """A bench server's latency at c=1 alone (no throughput), then stopped."""
    with contextlib.ExitStack() as stack:
        bench = BenchServer(cfg, work, name, server_args, domains, False, stack)
        return bench.figures(cfg, [bench.run(cycles) for _ in range(runs)], throughput_too=False)


# -- 3. the real stack ----------------------------------------------------------------

def real_stack(cfg, work: Path) -> dict:
    from tests.support.guest import TestGuest, virsh
    from tests.support.tgtd import TgtDaemon
    from tests.support.vmattach_process import ServeProcess
    state = work / "real-state"
    state.mkdir(parents=True, exist_ok=True)
    root = work / "real-root.img"
    with open(root, "wb") as fh:
        fh.truncate(16 << 20)
    tgtd = TgtDaemon(log_path=work / "real-tgtd.log").start()
    guest = serve = None
    try:
        guest = TestGuest.start(kind="diskless")
        # the diskless guest gets a SCSI root disk (a plain file, not a vmattach
        # volume): the facade then names volumes sd*, and a SCSI disk detaches
        # at once from a guest with no OS (a virtio one never does). Before the
        # facade starts: a disk added later is no lifecycle event, and the
        # facade would keep the server as it first saw it until its next refresh
        virsh(guest.uri, "attach-disk", guest.uuid, str(root), "sda", "--targetbus", "scsi",
              "--live")
        serve = ServeProcess(["--state-dir", str(state), "--listen", "127.0.0.1:0",
                              "--tgt-portal", tgtd.portal,
                              "--tgt-control-port", str(tgtd.control_port),
                              "--log-level", "WARNING", "--detach-timeout", "5",
                              "--detach-retries", "2"], work / "real-server.log")
        # the floor: the same tgtd and libvirt operations without vmattach, same
        # guest (its own device), same tgtd; its runs and vmattach's take turns
        from tests.bench.real_floor import direct_ops
        out: dict = {}
        # two floors: tgtd's requests as tgtadm commands, and on its control socket
        # (as the Controller sends them by default)
        with VmattachClient(serve.address, timeout=120) as client, \
                direct_ops(guest.uri, guest.uuid, tgtd.portal, tgtd.control_port,
                           work) as floor, \
                direct_ops(guest.uri, guest.uuid, tgtd.portal, tgtd.control_port,
                           work, tid=901, device="sdd", tgt="socket") as socket_floor:
            volume = client.create_volume(f"bench-real-{uuid.uuid4().hex[:6]}", 1).volume_id
            pairs = [(guest.uuid, volume)]
            assert client.get_server(guest.uuid).device_prefix == "sd"
            for _ in range(2):  # warm up
                client.attach_volume(guest.uuid, volume, device="/dev/sdb")
                client.detach_volume(guest.uuid, volume)
            runs = []
            for _ in range(cfg["real_runs"]):
                runs.append([latency(client, pairs, 1, cfg["real_cycles"], device="/dev/sdb")]
                            + [time_cycles(lambda _k, a=a: a(), lambda _k, d=d: d(), 1,
                                           cfg["real_cycles"]) for a, d in (floor, socket_floor)])
            out["server_rss_mb"] = vm_hwm_mb(serve.proc.pid)
        keys = ("attach_p50_ms", "detach_p50_ms", "attach_p99_ms", "detach_p99_ms")
        out.update({k: median([mine[k] for mine, *_ in runs]) for k in keys})
        # each run against each floor's run next to it; the median of those ratios
        for n, name in enumerate(("floor", "socket_floor"), 1):
            out[name] = {k: median([run[n][k] for run in runs]) for k in keys}
            for op in ("attach", "detach"):
                out[f"{name}_ratios_{op}"] = [run[0][f"{op}_p50_ms"] / run[n][f"{op}_p50_ms"]
                                              for run in runs]
    finally:
        if guest is not None:
            guest.destroy()
        if serve is not None:
            serve.stop()
        tgtd.stop()
    return out


# -- the run ---------------------------------------------------------------------------

def met(value: float, rule) -> bool:
    op, bound = rule
    return value <= bound if op == "<=" else value >= bound


def table(res: dict) -> str:
    o, s, cpa = res["orchestration"], res["scale"], res["calls_per_attach"]
    rows = [
        ("floor: no-op unary call p50 / p99", f"{res['floor_p50_ms']:.3f} / {res['floor_p99_ms']:.3f} ms", "", ""),
        ("gRPC calls per attach / per detach (counted)", f"{cpa:g} / {res['calls_per_detach']:g}"
         f" (in-process: {res['in_process_calls_per_attach']:g} /"
         f" {res['in_process_calls_per_detach']:g})", "", ""),
        ("SQL statements per attach (all services, BEGIN/COMMIT too)",
         f"{res['sql_per_attach']:g} ({res['sql_per_attach_without_transaction_control']:g}"
         " without BEGIN/COMMIT)", "<= 10", "sql_per_attach"),
        ("SQL statements per detach (all services, BEGIN/COMMIT too)",
         f"{res['sql_per_detach']:g} ({res['sql_per_detach_without_transaction_control']:g}"
         " without BEGIN/COMMIT)", "<= 8", "sql_per_detach"),
        ("orchestration attach p50 / p99 (c=1)", f"{o['attach_p50_ms']:.2f} / {o['attach_p99_ms']:.2f} ms", "", ""),
        ("orchestration detach p50 / p99 (c=1)", f"{o['detach_p50_ms']:.2f} / {o['detach_p99_ms']:.2f} ms", "", ""),
        ("orchestration ratio attach p50 / (calls x floor p50), runs in turn", f"{res['orchestration_ratio']:.2f}", "<= 1.3", "orchestration_ratio"),
    ]
    for c, v in res["cycles_per_s"].items():
        rows.append((f"orchestration cycles/s at concurrency {c}", f"{v:.1f}",
                     ">= 150" if c == "32" else "", "cycles_per_s_32" if c == "32" else ""))
    rows.append(("orchestration cycles/s c=32 / c=1 (runs in turn)",
                 f"{res['cycles_32_over_1']:.2f}", ">= 1", "cycles_32_over_1"))
    rows.append(("  server CPU per cycle at c=" + "/".join(o["cpu_ms_per_cycle"]),
                 " / ".join(f"{v[0]:.2f}" for v in o["cpu_ms_per_cycle"].values()) + " ms", "", ""))
    rt = res.get("orchestration_real_tgtd", {})
    if rt:
        rows.append(("  the all-in-one with a real tgtd: attach / detach p50 (c=1)",
                     f"{rt['attach_p50_ms']:.2f} / {rt['detach_p50_ms']:.2f} ms", "", ""))
    ip, ig = res["internal_in_process"], res["internal_grpc"]
    rows.append(("all-in-one attach / detach p50 (c=1), internal calls in-process / grpc, in turn",
                 f"{ip['attach_p50_ms']:.2f} / {ip['detach_p50_ms']:.2f} against"
                 f" {ig['attach_p50_ms']:.2f} / {ig['detach_p50_ms']:.2f} ms", "", ""))
    rows.append(("all-in-one cycles/s at c=" + "/".join(ip["cycles_per_s"])
                 + ", internal calls in-process / grpc",
                 " / ".join(f"{v:.1f}" for v in ip["cycles_per_s"].values()) + " against "
                 + " / ".join(f"{v:.1f}" for v in ig["cycles_per_s"].values()), "", ""))
    rows.append(("  server CPU per cycle, in-process / grpc",
                 " / ".join(f"{v[0]:.2f}" for v in ip["cpu_ms_per_cycle"].values()) + " against "
                 + " / ".join(f"{v[0]:.2f}" for v in ig["cpu_ms_per_cycle"].values()) + " ms",
                 "", ""))
    ap = res["orchestration_apart"]
    rows.append(("services apart (3 processes): attach / detach p50 (c=1)",
                 f"{ap['attach_p50_ms']:.2f} / {ap['detach_p50_ms']:.2f} ms", "", ""))
    for c, v in ap["cycles_per_s"].items():
        rows.append((f"services apart: cycles/s at concurrency {c}", f"{v:.1f}",
                     ">= 150" if c == "32" else "", "apart_cycles_per_s_32" if c == "32" else ""))
    rows.append(("services apart: cycles/s c=32 / c=1 (runs in turn)", f"{res['apart_cycles_32_over_1']:.2f}",
                 ">= 1", "apart_cycles_32_over_1"))
    rows.append(("  CPU per cycle (facade + Controller + Node) at c=" + "/".join(ap["cpu_ms_per_cycle"]),
                 " / ".join("+".join(f"{x:.1f}" for x in v) for v in ap["cpu_ms_per_cycle"].values())
                 + " ms", "", ""))
    rows.append(("attach p50 (c=1) TLS + tokens on / off, runs in turn",
                 f"{res['secure_attach_p50_ms']:.2f} / {res['insecure_attach_p50_ms']:.2f} ms"
                 f" (x{res['secure_ratio']:.2f})", "", ""))
    rows.append(("detach p50 (c=1) TLS + tokens on / off",
                 f"{res['secure_detach_p50_ms']:.2f} / {res['insecure_detach_p50_ms']:.2f} ms", "", ""))
    for word, key in (("on", "secure_cycles_per_s"), ("off", "insecure_cycles_per_s")):
        rows.append((f"cycles/s at c={'/'.join(res[key])}, TLS + tokens {word} (in turn)",
                     " / ".join(f"{v:.1f}" for v in res[key].values()), "", ""))
    rows += [
        ("real stack attach p50 / p99", f"{res['real_attach_p50_ms']:.1f} / {res['real_attach_p99_ms']:.1f} ms", "p50 <= 100", "real_attach_p50_ms"),
        ("real stack detach p50 / p99", f"{res['real_detach_p50_ms']:.1f} / {res['real_detach_p99_ms']:.1f} ms", "p50 <= 150", "real_detach_p50_ms"),
        ("real floor (tgtadm + virsh directly) attach / detach p50",
         f"{res['real_floor_attach_p50_ms']:.1f} / {res['real_floor_detach_p50_ms']:.1f} ms", "", ""),
        ("real stack / its floor, attach p50 (runs in turn)", f"{res['real_floor_ratio_attach']:.2f}", "<= 1.3",
         "real_floor_ratio_attach"),
        ("real stack / its floor, detach p50 (runs in turn)", f"{res['real_floor_ratio_detach']:.2f}", "<= 1.3",
         "real_floor_ratio_detach"),
        ("real floor with tgtd's socket (as the Controller) attach / detach p50",
         f"{res['real_socket_floor_attach_p50_ms']:.1f} / {res['real_socket_floor_detach_p50_ms']:.1f} ms", "", ""),
        ("real stack / that floor, attach / detach p50 (runs in turn)",
         f"{res['real_socket_floor_ratio_attach']:.2f} / {res['real_socket_floor_ratio_detach']:.2f}", "", ""),
        ("scale attach p50 / p99 (c=1)", f"{s['attach_p50_ms']:.2f} / {s['attach_p99_ms']:.2f} ms", "", ""),
        ("scale detach p50 / p99 (c=1)", f"{s['detach_p50_ms']:.2f} / {s['detach_p99_ms']:.2f} ms", "", ""),
        ("scale cycles/s at concurrency " + "/".join(s["cycles_per_s"]),
         " / ".join(f"{v:.1f}" for v in s["cycles_per_s"].values()), "", ""),
        ("scale ratio attach p50 full / empty, runs in turn", f"{res['scale_ratio']:.2f}", "<= 1.2", "scale_ratio"),
        ("scale ratio detach p50 full / empty, runs in turn", f"{res['scale_detach_ratio']:.2f}", "", ""),
        ("all-in-one peak RSS, empty / full database", f"{res['empty_peak_rss_mb']:.1f} / {res['peak_rss_mb']:.1f} MB", "full <= 200", "peak_rss_mb"),
    ]
    w = max(len(r[0]) for r in rows)
    vw = max(len(r[1]) for r in rows)
    lines = [f"{'figure'.ljust(w)}  {'value'.ljust(vw)}  {'target'.ljust(11)}  met",
             "-" * (w + vw + 22)]
    for label, value, target, key in rows:
        flag = ""
        if key:
            flag = "yes" if res["targets"][key]["met"] else "NO"
        lines.append(f"{label.ljust(w)}  {value.ljust(vw)}  {target.ljust(11)}  {flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check that it runs)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results.json"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--cell", action="store_true",
                   help="the scale part at a Nova cell's size: 1,000,000 volumes, 100,000"
                        " servers on 1,000 nodes (not part of make bench: see bench/README.md)")
    args = p.parse_args(argv)
    cfg = SMOKE if args.smoke or os.environ.get("VMATTACH_BENCH_SMOKE") == "1" else FULL
    if args.cell:
        cfg = dict(cfg, scale_volumes=1_000_000, scale_nodes=1000, scale_per_node=100)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vmattach-bench-"))
    res: dict = {"mode": "smoke" if cfg is SMOKE else "full", "config": cfg,
                 "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        stack = contextlib.ExitStack()
        with stack:
            log("1/5 floor")
            probe = FloorProbe(stack.enter_context(
                Child("tests.bench.floor_server", [], work / "floor.log")).address)
            stack.callback(probe.ch.close)
            res.update(measure_floor(cfg, probe))
            log("2/5 counting the gRPC calls of one attach")
            res.update(count_calls(cfg, work))
            log("3/5 orchestration (empty databases, fake hypervisor, fake tgtd), in turn with"
                " runs of the floor")
            empty = BenchServer(cfg, work, "empty", [], cfg["domains"], True, stack)
            runs, floors = in_turns(cfg["lat_runs"], lambda: empty.run(cfg["lat_cycles"]),
                                    lambda: probe.block(cfg["floor_calls"]))
            o = empty.figures(cfg, runs)
            o["floor_runs_p50_ms"] = [p50 for p50, _ in floors]
            res["orchestration"] = o
            log("    orchestration with the three services apart (three processes)")
            with contextlib.ExitStack() as apart_stack:
                apart = BenchServer(cfg, work, "apart", [], cfg["domains"], True, apart_stack,
                                    apart=True)
                res["orchestration_apart"] = apart.figures(
                    cfg, [apart.run(cfg["lat_cycles"]) for _ in range(cfg["lat_runs"])])
            log("    the all-in-one with internal_calls = grpc, in turn with the default")
            with contextlib.ExitStack() as grpc_stack:
                loopback = BenchServer(cfg, work, "grpc-internal", ["--internal-calls", "grpc"],
                                       cfg["domains"], True, grpc_stack)
                res["internal_in_process"], res["internal_grpc"] = side_by_side(
                    cfg, empty, loopback, cfg["lat_runs"], cfg["lat_cycles"])
            log("    orchestration with a real tgtd (c=1)")
            from tests.support.tgtd import TgtDaemon
            with TgtDaemon(log_path=work / "orch-tgtd.log") as tgtd:
                res["orchestration_real_tgtd"] = orchestration(
                    cfg, work, "realtgt", ["--tgt", "real", "--tgt-portal", tgtd.portal,
                                           "--tgt-control-port", str(tgtd.control_port)],
                    8, runs=cfg["realtgt_runs"], cycles=cfg["realtgt_cycles"])
            log("    security: TLS + tokens on, and off (same settings, runs in turn)")
            with contextlib.ExitStack() as sec:
                off = BenchServer(cfg, work, "sec-off", [], cfg["domains"], True, sec)
                on = BenchServer(cfg, work, "sec-on", ["--secure"], cfg["domains"], True, sec)
                res["security_off"], res["security_on"] = side_by_side(
                    cfg, off, on, cfg["sec_runs"], cfg["sec_cycles"])
            log("4/5 real stack (tgtd + libvirtd + QEMU)")
            real = real_stack(cfg, work)
            res["real_stack"] = real
            log("5/5 scale: pre-filling the databases")
            scale_state = work / "scale-state"
            res["prefill"] = prefill(scale_state, cfg["scale_volumes"], cfg["scale_nodes"],
                                     cfg["scale_per_node"])
            log(f"    pre-filled {res['prefill']}; starting {cfg['scale_nodes'] - 1} fake nodes")
            farm = stack.enter_context(Child(
                "tests.bench.farm", ["--state-dir", str(work / "farm"), "--first", "1",
                                     "--nodes", str(cfg["scale_nodes"] - 1),
                                     "--domains", str(cfg["scale_per_node"]), "--prefilled"],
                work / "farm.log", timeout=300))
            farm_addrs = farm.first_line.split(" ", 1)[1]
            log("    scale: orchestration on the full databases, in turn with the empty ones")
            full = BenchServer(cfg, work, "scale", ["--prefilled", "--farm", farm_addrs],
                               cfg["scale_per_node"], True, stack)
            runs_full, runs_empty = in_turns(cfg["lat_runs"], lambda: full.run(cfg["lat_cycles"]),
                                             lambda: empty.run(cfg["lat_cycles"]))
            s = full.figures(cfg, runs_full)
            s["empty_runs"] = combined(runs_empty)
            res["scale"] = s
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    o, s = res["orchestration"], res["scale"]
    res.update({
        "orchestration_attach_p50_ms": o["attach_p50_ms"],
        "orchestration_attach_p99_ms": o["attach_p99_ms"],
        "orchestration_detach_p50_ms": o["detach_p50_ms"],
        "orchestration_detach_p99_ms": o["detach_p99_ms"],
        "orchestration_ratio": paired_ratio(
            o["runs_attach_p50_ms"],
            [res["calls_per_attach"] * f for f in o["floor_runs_p50_ms"]]),
        "cycles_per_s": o["cycles_per_s"],
        "real_attach_p50_ms": real["attach_p50_ms"],
        "real_attach_p99_ms": real["attach_p99_ms"],
        "real_detach_p50_ms": real["detach_p50_ms"],
        "real_detach_p99_ms": real["detach_p99_ms"],
        "real_floor_attach_p50_ms": real["floor"]["attach_p50_ms"],
        "real_floor_detach_p50_ms": real["floor"]["detach_p50_ms"],
        "real_floor_ratio_attach": median(real["floor_ratios_attach"]),
        "real_floor_ratio_detach": median(real["floor_ratios_detach"]),
        "real_socket_floor_attach_p50_ms": real["socket_floor"]["attach_p50_ms"],
        "real_socket_floor_detach_p50_ms": real["socket_floor"]["detach_p50_ms"],
        "real_socket_floor_ratio_attach": median(real["socket_floor_ratios_attach"]),
        "real_socket_floor_ratio_detach": median(real["socket_floor_ratios_detach"]),
        "scale_attach_p50_ms": s["attach_p50_ms"],
        "scale_detach_p50_ms": s["detach_p50_ms"],
        "scale_cycles_per_s": s["cycles_per_s"],
        "scale_ratio": paired_ratio(s["runs_attach_p50_ms"],
                                    s["empty_runs"]["runs_attach_p50_ms"]),
        "scale_detach_ratio": paired_ratio(s["runs_detach_p50_ms"],
                                           s["empty_runs"]["runs_detach_p50_ms"]),
        "scale_cycles_ratio": {c: s["cycles_per_s"][c] / o["cycles_per_s"][c]
                               for c in o["cycles_per_s"]},
        "peak_rss_mb": s["peak_rss_mb"],
        "secure_attach_p50_ms": res["security_on"]["attach_p50_ms"],
        "insecure_attach_p50_ms": res["security_off"]["attach_p50_ms"],
        "secure_ratio": paired_ratio(res["security_on"]["runs_attach_p50_ms"],
                                     res["security_off"]["runs_attach_p50_ms"]),
        "secure_detach_p50_ms": res["security_on"]["detach_p50_ms"],
        "insecure_detach_p50_ms": res["security_off"]["detach_p50_ms"],
        "secure_cycles_per_s": res["security_on"]["cycles_per_s"],
        "insecure_cycles_per_s": res["security_off"]["cycles_per_s"],
        "empty_peak_rss_mb": o["peak_rss_mb"],
    })
    ap = res["orchestration_apart"]
    res.update({"apart_attach_p50_ms": ap["attach_p50_ms"],
                "apart_detach_p50_ms": ap["detach_p50_ms"],
                "apart_cycles_per_s": ap["cycles_per_s"]})
    for prefix, figures in (("", o), ("apart_", ap)):
        res[prefix + "cycles_32_over_1"] = figures.get("cycles_32_over_1", 0.0)
    values = {**res, "cycles_per_s_32": res["cycles_per_s"].get("32", 0.0),
              "apart_cycles_per_s_32": res["apart_cycles_per_s"].get("32", 0.0)}
    res["targets"] = {k: {"value": values[k], "rule": f"{op} {b}", "met": met(values[k], (op, b))}
                      for k, (op, b) in TARGETS.items()}
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(table(res))
    print(f"\n{res['mode']} run in {res['elapsed_s']} s on {os.cpu_count()} CPUs; "
          f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
