"""Benchmark of the node end to end: time from the last instance received to the SR and SEG stored
in a real Orthanc, for a 32-slice and a 150-slice head CT, split by step from the node's own audit
timings, and the node's peak RSS.

Run ``python benchmarks/bench_node_latency.py [--slices 32 150] [--quiet-seconds 2] [--json F]``.
It starts Debian's Orthanc (the PACS, as in the integration tests) and ``radnet-node serve`` with
Orthanc as its destination, writes one synthetic 512 x 512 head CT per size (its own study each),
sends it with DCMTK ``storescu`` (``TCP_NODELAY=1``), waits until Orthanc holds the study's SR and
SEG, and reads ``radnet-node audit show STUDY --json``. Reported per size:

- ``last instance -> stored``: from the audit's "last instance" step to "stored at orthanc" (both
  stamped by the node; the export is stored once Orthanc has answered every C-STORE);
- the audit steps between them (quiet period to "complete", queue wait, inference to "result
  written", export), and the engine's own stage times (read/decode, preprocess, model,
  postprocess, write);
- ``storescu exit -> seen in Orthanc``: the same latency measured from outside, by polling
  Orthanc's REST API every 0.1 s (so up to 0.1 s late);
- the node's peak RSS (VmHWM) after each size.

The quiet period (``--quiet-seconds``) is part of the latency by design (DICOM has no end-of-series
signal). Weights: the shipped ones when installed, else random full-size RADnet weights (same
architecture and cost, meaningless output), or ``--weights FILE``; ``--tiny-model`` only checks
the script. Quote figures only from a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.append(str(REPO / "tests"))  # fixed_weights (after tests/integration: its conftest)
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_ingest import synthetic_series  # noqa: E402
from conftest import orthanc_destination  # noqa: E402
from dcmtk import storescu  # noqa: E402
from node_process import NodeProcess, vm_hwm_mb, write_test_weights  # noqa: E402
from orthanc import Modality, Orthanc, wait_for  # noqa: E402

from radnet_node.weights import shipped_weights_path  # noqa: E402

# audit steps from the last instance on, in order (names as `radnet-node audit show` writes them)
STEP_NAMES = ("complete", "queued", "running", "result written", "job done")
ENGINE_STAGES = ("read_decode", "preprocess", "model", "postprocess", "write", "total")


def pick_weights(args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    """The weights to run and a description of them."""
    if args.weights:
        return args.weights, f"given ({args.weights})"
    if args.tiny_model:
        return write_test_weights(folder / "tiny.pt"), "tiny test model (script check only)"
    shipped = shipped_weights_path()
    if shipped.is_file():
        return shipped, "shipped (trained)"
    random = write_test_weights(folder / "random-radnet.pt", model={})
    return random, "untrained full-size RADnet (same cost as trained, output meaningless)"


def _seconds_between(steps: list[dict[str, Any]], first: str, last: str) -> float | None:
    at = {s["step"]: s["at"] for s in steps}
    if first not in at or last not in at:
        return None
    start = datetime.fromisoformat(at[first].replace("Z", "+00:00"))
    end = datetime.fromisoformat(at[last].replace("Z", "+00:00"))
    return (end - start).total_seconds()


def run_size(node: NodeProcess, orthanc: Orthanc, folder: Path, slices: int) -> dict[str, Any]:
    """Send one series of ``slices`` slices and measure it.

    Raises
    ------
    SystemExit
        The send failed or the story has no delivered result.
    """
    files = synthetic_series(folder / f"series-{slices}", slices, 512)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sent = storescu("127.0.0.1", node.port, files, called_ae=node.ae_title, timeout_s=600)
    sent_at = time.perf_counter()
    if sent.returncode != 0:
        raise SystemExit(f"storescu failed ({sent.returncode}): {sent.stdout[-2000:]}")

    def ready() -> bool:
        grouped = orthanc.instances_by_modality(study_uid)
        return bool(grouped.get("SR")) and bool(grouped.get("SEG"))

    wait_for(ready, timeout_s=1800, interval_s=0.1, what=f"SR and SEG of the {slices}-slice study")
    seen_after = time.perf_counter() - sent_at
    wait_for(node.settled, timeout_s=300, what="the node to settle")
    story = node.audit_show(study_uid)
    runs = [s for s in story["series"] if s["results"]]
    if len(runs) != 1:
        raise SystemExit(f"{slices} slices: expected one series with a result, got {len(runs)}")
    series = runs[0]
    steps = series["steps"]
    delivered = next((s["step"] for s in steps if s["step"].startswith("stored at")), None)
    if delivered is None:
        raise SystemExit(f"{slices} slices: no 'stored at' step in {[s['step'] for s in steps]}")
    by_step = {s["step"]: s["seconds"] for s in steps}
    timings = series["results"][-1].get("timings_ms") or {}
    return {
        "slices": slices,
        "last_instance_to_stored_s": _seconds_between(steps, "last instance", delivered),
        "storescu_exit_to_seen_in_orthanc_s": seen_after,
        "steps_s": {name: by_step.get(name) for name in (*STEP_NAMES, delivered)},
        "engine_ms": {stage: timings.get(stage) for stage in ENGINE_STAGES},
        "node_peak_rss_mb": vm_hwm_mb(node.pid),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print a Markdown table; returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[32, 150])
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--tiny-model", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        weights, description = pick_weights(args, work / "weights")
        node = NodeProcess(work / "node", weights=weights, quiet_seconds=args.quiet_seconds)
        # the engine's own device and thread defaults, not the tests' single thread
        node.sections = {"model": {"device": None, "threads": None}}
        orthanc = Orthanc(
            workdir=work / "orthanc",
            modalities=[Modality("radnet", node.ae_title, "127.0.0.1", node.port)],
        )
        node.destinations = [orthanc_destination(orthanc)]
        with orthanc, node:
            rows = [run_size(node, orthanc, work, n) for n in args.slices]

    print(f"\nweights: {description}; quiet_seconds {args.quiet_seconds:g}\n")
    stored_step = next(k for k in rows[0]["steps_s"] if k.startswith("stored at"))
    header = ["slices", "last instance -> stored s", "quiet", "queue", "inference", "export",
              "engine model ms", "engine total ms", "outside view s", "peak RSS MB"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        steps = row["steps_s"]
        cells = [
            row["slices"],
            row["last_instance_to_stored_s"],
            steps["complete"],
            (steps["queued"] or 0.0) + (steps["running"] or 0.0),
            steps["result written"],
            steps[stored_step],
            row["engine_ms"]["model"],
            row["engine_ms"]["total"],
            row["storescu_exit_to_seen_in_orthanc_s"],
            row["node_peak_rss_mb"],
        ]
        print("| " + " | ".join(_cell(c) for c in cells) + " |")
    figures = {
        "weights": description,
        "quiet_seconds": args.quiet_seconds,
        "rows": rows,
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


if __name__ == "__main__":
    main()
