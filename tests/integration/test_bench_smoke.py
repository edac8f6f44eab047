"""``bench/bench_blackout.py --quick`` keeps working: it runs, and its JSON has every figure.

No timing is asserted: the figures only have to be there and be positive.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from khod.broker import PrivateBroker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_blackout.py"


def positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


def check_summary(s: dict[str, Any], what: str) -> None:
    assert s["n"] > 0, what
    for k in ("p50", "p99", "min", "max"):
        assert positive(s[k]), f"{what}.{k} = {s[k]!r}"
    assert s["p50"] <= s["p99"], what


def run_bench(script: Path, out: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run a benchmark to completion; what it printed, and the JSON it wrote to ``out``."""
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_private_broker_listens_on_unix_and_tcp() -> None:
    with PrivateBroker(unix_and_tcp=True) as b:
        assert b.url == b.unix_url
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(b.unix_url.removeprefix("unix://"))
        with socket.create_connection(("127.0.0.1", b.port), timeout=5):
            pass
        conf = b.conf_path.read_text()
        assert "set_tcp_nodelay true" in conf


def test_bench_quick(tmp_path: Path) -> None:
    printed, res = run_bench(BENCH, tmp_path / "bench.json", "--quick", "--workdir", str(tmp_path))
    assert "target" in printed

    for key in ("date", "machine", "load", "config", "blackout", "requests", "rss", "targets"):
        assert key in res, key
    for key in ("cpu", "cpus", "kernel", "python", "mosquitto"):
        assert res["machine"][key], key
    assert res["load"]["start"] and res["load"]["end"]

    assert res["config"]["auto_freeze"] is False  # the operator's freeze, by default
    assert [b["n"] for b in res["blackout"]] == [5]
    b = res["blackout"][0]
    check_summary(b["floor_s"], "floor")
    assert set(b["fragments"]) == {"64", "4096"}
    for size, f in b["fragments"].items():
        assert f["error"] is None, f["error"]
        assert positive(f["fragment_bytes"]) and f["fragment_bytes"] <= 4096
        assert len(f["rounds"]) == 2
        for key in ("begin_commit_s", "register_commit_s", "blackout_external_s"):
            check_summary(f[key], f"{size}.{key}")
        # CPU each role spent inside the window (ticks: may be zero at N=5).
        assert {"daemon", "broker", "participants"} <= set(f["cpu_s"]), f["cpu_s"]
        # Reported by the daemon if its committed status says so (optional).
        if f["blackout_daemon_s"]["n"]:
            check_summary(f["blackout_daemon_s"], f"{size}.blackout_daemon_s")

    for transport in ("unix", "tcp"):
        q = res["requests"][transport]
        for key in ("echo_s", "status_s", "fragment_s"):
            check_summary(q[key], f"{transport}.{key}")
        assert q["status_errors"] == 0 and q["fragment_errors"] == 0

    rss = res["rss"]
    assert rss["participants"] == 200 and rss["register_errors"] == 0
    assert rss["registered"] == 200
    assert positive(rss["vmhwm_kib"])

    assert res["targets"]
    for t in res["targets"]:
        assert positive(t["value"]), t
        assert t["pass"] in (True, False)


def test_bench_with_the_freeze_at_the_last_fragment(tmp_path: Path) -> None:
    args = ["--sizes", "5", "--rounds", "1", "--requests", "0", "--rss-participants", "0"]
    _, res = run_bench(BENCH, tmp_path / "bench.json", *args, "--auto-freeze")
    assert res["config"]["auto_freeze"] is True
    for size, f in res["blackout"][0]["fragments"].items():
        assert f["error"] is None, f["error"]
        check_summary(f["blackout_external_s"], f"{size}.blackout_external_s")


def test_bench_publish_runs_and_writes_every_figure(tmp_path: Path) -> None:
    script = ROOT / "bench" / "bench_publish.py"
    printed, res = run_bench(script, tmp_path / "publish.json", "--count", "500", "--rounds", "1")
    assert "khod seq" in printed
    assert res["machine"]["cpus"]
    for transport in ("tcp", "unix"):
        for kind in ("khod seq", "bare seq", "khod batch", "bare batch"):
            assert positive(res[transport][kind]), (transport, kind)
