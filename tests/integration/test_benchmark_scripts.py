"""The benchmarks run (on tiny inputs): a benchmark that breaks is found by CI, not by the next
person who wants figures. The figures themselves are not checked here (they are not tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pacs import need_program

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(  # noqa: S603 - our own script
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_bench_ingest_runs_and_prints_the_ratio_to_dcmtk(tmp_path: Path) -> None:
    need_program("storescu")
    need_program("storescp")
    saved = tmp_path / "run.json"
    out = _run(
        "bench_ingest.py", "--slices", "6", "--size", "64", "--repeats", "1", "--split",
        "--json", str(saved),
    )  # fmt: skip
    assert re.search(r"^\| dcmtk storescp \| \d+", out, re.MULTILINE), out
    assert re.search(r"^\| radnet-node \| \d+", out, re.MULTILINE), out
    assert re.search(r"^\| radnet-node, Python loop \| \d+", out, re.MULTILINE), out
    assert re.search(r"^\| radnet-node, fsync_spool = true \| \d+", out, re.MULTILINE), out
    assert re.search(r"^ratio radnet-node / DCMTK: \d+\.\d+", out, re.MULTILINE), out
    assert re.search(r"with the Python loop: \d+\.\d+", out), out
    assert re.search(r"dataset written to the spool \(and header scanned\) \d+\.\d+", out), out
    assert re.search(r"recorder thread, in parallel \d+\.\d+", out), out
    assert "CPU per instance, us" in out, out
    assert re.search(r"^\| radnet-node \|( \d+ \|){4}$", out, re.MULTILINE), out
    # saved runs pooled: their rounds as one sample
    pooled = _run("bench_ingest.py", "--pool", str(saved), str(saved))
    assert re.search(r"^2 runs, 2 rounds: ratio radnet-node / DCMTK \d+\.\d+", pooled), pooled


def test_bench_node_latency_runs_against_orthanc() -> None:
    need_program("storescu")
    need_program("Orthanc")
    out = _run("bench_node_latency.py", "--tiny-model", "--slices", "6")
    assert re.search(r"^\| 6 \| \d+\.\d+ \|", out, re.MULTILINE), out
