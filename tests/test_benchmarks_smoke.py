"""Smoke test of the benchmark script: it runs end to end and prints its tables.

No timing assertions: this only checks that `benchmarks/run.py --quick` works (and writes
nothing with --no-write), and that it still runs, with a note, when the anchors are missing.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The test session's 4 fake CPU devices are not what the benchmark is about.
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-write", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quick_run_prints_tables_and_writes_nothing(tmp_path):
    docs = ROOT / "docs"
    before = {p: p.stat().st_mtime_ns for p in docs.glob("benchmarks*")} if docs.is_dir() else {}
    result = _run("--out-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "| Method | compile (s) | forward (ms) |" in out
    assert "|---|---:|" in out
    for section in (
        "(a) DEQ fixed point",
        "(b) Ridge regression root",
        "(c) Flax DEQ training step",
    ):
        assert section in out
    assert "implicax" in out and "## Targets" in out
    assert list(tmp_path.iterdir()) == []
    after = {p: p.stat().st_mtime_ns for p in docs.glob("benchmarks*")} if docs.is_dir() else {}
    assert after == before


def test_runs_without_anchors(tmp_path):
    result = _run("--no-anchors", "--problems", "b", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "jaxopt, optimistix not available" in result.stdout
    assert "| Method | compile (s) |" in result.stdout
    assert "jaxopt custom_root" not in result.stdout
