"""`make bench` with tiny sizes (tests/bench/run.py --smoke): every part
runs and bench's JSON has every figure as a positive number."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import need

pytestmark = pytest.mark.realstack

KEYS = ["floor_p50_ms", "calls_per_attach", "orchestration_attach_p50_ms",
        "orchestration_ratio", "real_attach_p50_ms", "real_detach_p50_ms", "scale_ratio",
        "peak_rss_mb", "secure_attach_p50_ms", "insecure_attach_p50_ms", "secure_ratio",
        "sql_per_attach", "sql_per_detach", "real_floor_ratio_attach", "real_floor_ratio_detach",
        "real_socket_floor_ratio_attach", "real_socket_floor_ratio_detach",
        "apart_attach_p50_ms", "apart_detach_p50_ms", "apart_cycles_32_over_1", "cycles_32_over_1",
        "secure_detach_p50_ms", "insecure_detach_p50_ms", "in_process_calls_per_attach",
        "in_process_calls_per_detach"]


@pytest.mark.timeout(240)
def test_bench_smoke_writes_every_figure(tmp_path):
    need("tgtd", "virsh")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tests.bench.run", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(res[key], (int, float)) and res[key] > 0, (key, res.get(key))
    for part, processes in (("orchestration", 1), ("orchestration_apart", 3),
                            ("security_on", 1), ("security_off", 1),
                            ("internal_in_process", 1), ("internal_grpc", 1)):
        assert set(res[part]["cycles_per_s"]) == {"1", "8", "32"}, part
        assert all(v > 0 for v in res[part]["cycles_per_s"].values()), part
        # every server process measured in every throughput run; the facade was busy
        assert all(len(v) == processes and v[0] > 0 and min(v) >= 0
                   for v in res[part]["cpu_ms_per_cycle"].values()), part
    assert res["cycles_per_s"] == res["orchestration"]["cycles_per_s"]
    # c=32 / c=1: each c=32 run over the c=1 run of its round, not two medians
    from tests.bench.common import median
    for part, key in (("orchestration", "cycles_32_over_1"),
                      ("orchestration_apart", "apart_cycles_32_over_1")):
        runs = res[part]["runs_cycles_per_s"]
        assert len(runs["1"]) == len(runs["32"]) >= 2, part
        assert res[key] == median([a / b for a, b in zip(runs["32"], runs["1"], strict=True)]), part
    # the servers measured side by side run each concurrency's runs apart: no such ratio
    assert "cycles_32_over_1" not in res["security_on"]
    # counted, not a constant: the calls of docs/attach-flow.md, each once
    from tests.integration.test_call_sequence import ATTACH, DETACH
    for flow, key in ((ATTACH, "attach_calls_by_method"), (DETACH, "detach_calls_by_method")):
        assert res[key] == {"/vmattach.v1." + s.call.replace(".", "/"): 1.0
                            for s in flow if s.call}, key
    assert res["calls_per_attach"] == len(res["attach_calls_by_method"])
    # the all-in-one makes every one of them in-process (internal_calls' default)
    assert (res["in_process_calls_per_attach"], res["in_process_calls_per_detach"]) == \
        (res["calls_per_attach"], res["calls_per_detach"])
    assert "orchestration ratio" in proc.stdout
    assert "TLS + tokens on / off" in proc.stdout
