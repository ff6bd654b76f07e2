"""Benchmark of ``radnet-node infer``: time per stage and peak memory from DICOM files to SR + SEG.

Run ``python benchmarks/bench_infer.py [--quick] [--json out.json] [--threads 2]``. It writes a
32-slice and a 150-slice synthetic head CT (512 x 512), runs the infer use case on each with the
full-size RADnet (the shipped weights when present, else random weights of the same architecture),
and prints per-stage times (read + decode, preprocess, model, postprocess, write), the end-to-end
time and peak RSS. It also measures the CPU execution modes the engine can choose from (precision,
memory format, slices per call) and, where the CPU has bf16, the largest slice-probability
difference of bf16 against fp32 on the real Philips series (the engine's BF16_TOLERANCE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radnet_node.dicom_out import NodeIdentity
from radnet_node.engine import (
    BF16_TOLERANCE,
    Engine,
    EngineSettings,
    cpu_supports_bf16,
    default_threads,
)
from radnet_node.infer import SeriesDone, process_series
from radnet_node.model import build_model
from radnet_node.preprocess import PreprocessSpec
from radnet_node.series import scan_paths
from radnet_node.weights import export_weights, shipped_weights_path
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

PHILIPS_5MM = (
    Path(__file__).resolve().parents[2]
    / "shared/data/dicom/dcm_qa_ct/Philips_Ingenuity_head_phantom/S21570/S2010"
)
STAGES = ("read_decode", "preprocess", "model", "postprocess", "write", "total")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-N square matmul throughput: the reference the model's speed is compared with."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def synthetic_head(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 512, 512) HU: an elliptic skull and brain with noise and a small bright blob."""
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    y, x = (yy - 255.5) * 0.45, (xx - 255.5) * 0.45
    outer = (y / 90.0) ** 2 + (x / 72.0) ** 2 <= 1.0
    inner = (y / 84.0) ** 2 + (x / 66.0) ** 2 <= 1.0
    plane = np.full((512, 512), -1000.0, dtype=np.float32)
    plane[outer] = 1000.0
    plane[inner] = 32.0
    volume = np.repeat(plane[None], n, axis=0)
    volume[:, inner] += rng.normal(0.0, 4.0, size=(n, int(inner.sum()))).astype(np.float32)
    blob = (y - 20.0) ** 2 + (x + 25.0) ** 2 <= 15.0**2
    volume[n // 3 : n // 2, blob] = 70.0
    return volume


def write_series(folder: Path, n: int, spacing_mm: float, seed: int) -> Path:
    geometry = SeriesGeometry(
        rows=512,
        columns=512,
        pixel_spacing_mm=(0.45, 0.45),
        table_positions_mm=tuple(float(z) for z in np.arange(n) * spacing_mm),
        slice_thickness_mm=spacing_mm,
    )
    out = folder / f"series-{n}"
    write_ct_series(
        synthetic_head(n, np.random.default_rng(seed)),
        geometry,
        out,
        StudyInfo(uid_seed=f"bench-infer-{n}"),
        series_description=f"HEAD {spacing_mm:g}MM (BENCH)",
    )
    return out


def weights_for_benchmark(folder: Path) -> tuple[Path, str]:
    shipped = shipped_weights_path()
    if shipped.is_file():
        return shipped, "shipped (trained)"
    torch.manual_seed(0)
    out = folder / "random-radnet.pt"
    export_weights(
        build_model("radnet"),
        out,
        name="radnet-random",
        version="0.0.0",
        preprocess=PreprocessSpec(),
        threshold=0.5,
        min_consecutive_slices=3,
        training_data={"description": "none: random weights for timing"},
        training={},
        metrics={},
        limitations=["timing only"],
    )
    return out, "random (untrained, full-size architecture)"


def run_infer(engine: Engine, series_dir: Path, out: Path, repeats: int) -> dict[str, Any]:
    """Median stage times over ``repeats`` runs of the infer use case on one series."""
    (group,) = scan_paths([series_dir]).series
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        outcome = process_series(group, out, engine, NodeIdentity())
        if not isinstance(outcome, SeriesDone):
            raise SystemExit(f"benchmark series failed: {outcome}")
        runs.append(dict(outcome.timings_ms))
    n = len(outcome.result.slice_probabilities)
    medians = {stage: statistics.median(r[stage] for r in runs) for stage in STAGES}
    return {
        "slices": n,
        "repeats": repeats,
        "median_ms": medians,
        "model_ms_per_slice": medians["model"] / n,
        "peak_rss_mb": peak_rss_mb(),
    }


def cpu_modes(
    weights: Path, series_dir: Path, slices: int, repeats: int, threads: int | None
) -> list[dict[str, Any]]:
    """Model time per slice of each CPU mode, on the first ``slices`` prepared slices."""
    modes: list[tuple[str, bool, int]] = [("fp32", False, 4), ("fp32", True, 4)]
    if cpu_supports_bf16():
        modes += [("bf16", False, 4), ("bf16", True, 1), ("bf16", True, 4), ("bf16", True, 8)]
    (group,) = scan_paths([series_dir]).series
    engines = {
        mode: Engine(
            EngineSettings(
                weights=weights,
                device="cpu",
                precision=mode[0],
                channels_last=mode[1],
                chunk_slices=mode[2],
                threads=threads,  # one line per mode field
            )
        )  # fmt: skip
        for mode in modes
    }
    prepared = engines[modes[0]].load(group.paths[:slices] if slices else group.paths).prepared
    times: dict[tuple[str, bool, int], list[float]] = {mode: [] for mode in modes}
    for engine in engines.values():
        engine.run([prepared])  # warm-up: oneDNN picks kernels for these shapes
    for _ in range(repeats):  # interleaved rounds, so a noisy neighbour hits every mode alike
        for mode, engine in engines.items():
            result = engine.run([prepared])[0]
            times[mode].append(result.timings_ms["model"] / len(prepared.slices))
    return [
        {
            "precision": p,
            "channels_last": cl,
            "chunk_slices": c,
            "threads": torch.get_num_threads(),
            "ms_per_slice": statistics.median(times[(p, cl, c)]),
        }
        for (p, cl, c) in modes
    ]


def bf16_difference(weights: Path, threads: int | None) -> dict[str, Any] | None:
    """max |p_bf16 - p_fp32| over the slices of the real Philips 5 mm series."""
    if not cpu_supports_bf16() or not PHILIPS_5MM.is_dir():
        return None
    (group,) = scan_paths([PHILIPS_5MM]).series
    fp32 = Engine(EngineSettings(weights=weights, device="cpu", precision="fp32", threads=threads))
    bf16 = Engine(EngineSettings(weights=weights, device="cpu", precision="bf16", threads=threads))
    loaded = fp32.load(group.paths)
    a, b = fp32.run([loaded])[0], bf16.run([loaded])[0]
    difference = float(np.abs(a.slice_probabilities - b.slice_probabilities).max())
    mask_disagreement = float(np.mean(a.hemorrhage_mask != b.hemorrhage_mask))
    return {
        "series": str(PHILIPS_5MM),
        "max_abs_probability_difference": difference,
        "tolerance": BF16_TOLERANCE,
        "within_tolerance": difference <= BF16_TOLERANCE,
        "same_ct_decision": a.ct_positive == b.ct_positive,
        "mask_pixel_disagreement": mask_disagreement,
    }


def cli_wall_time(series_dir: Path, weights: Path, out: Path) -> float:
    """Seconds for a fresh ``radnet-node infer`` process: imports, weight loading and the run."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "radnet_node.cli", "infer", str(series_dir), "--out", str(out),
         "--weights", str(weights)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no mode sweep")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the engine's)"
    )
    parser.add_argument("--device", default="auto", help="engine device for the infer runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    repeats = 1 if args.quick else 3
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_bf16": cpu_supports_bf16(),
            "load_average_at_start": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "matmul_gflops_start": {
            "fp32": matmul_peak_gflops(torch.float32),
            "bf16": matmul_peak_gflops(torch.bfloat16) if cpu_supports_bf16() else None,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        folder = Path(tmp)
        weights, kind = weights_for_benchmark(folder)
        report["weights"] = kind
        # written by a child process, so this process' peak RSS is inference alone
        with ProcessPoolExecutor(max_workers=1) as pool:
            jobs = {n: pool.submit(write_series, folder, n, 5.0 if n <= 32 else 1.0, n)
                    for n in (32, 150)}  # fmt: skip
            series = {n: job.result() for n, job in jobs.items()}
        engine = Engine(EngineSettings(weights=weights, device=args.device, threads=args.threads))
        report["engine"] = engine.describe()
        report["rss_after_engine_load_mb"] = peak_rss_mb()
        report["infer"] = {
            str(n): run_infer(engine, path, folder / "out", repeats) for n, path in series.items()
        }
        if not args.quick:
            report["cpu_modes"] = cpu_modes(weights, series[32], 8, 3, args.threads)
        report["bf16_vs_fp32"] = bf16_difference(weights, args.threads)
        report["cli_wall_s_32"] = cli_wall_time(series[32], weights, folder / "cli-out")
    report["matmul_gflops_end"] = {"fp32": matmul_peak_gflops(torch.float32)}
    report["load_average_at_end"] = os.getloadavg()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(
        f"# radnet-node infer benchmark\n\n{machine['platform']}, {machine['cpus']} CPUs, "
        f"{machine['cpu_capability']}, torch {machine['torch']} ({machine['threads']} threads), "
        f"CUDA: {machine['cuda']}; weights: {report['weights']}\n"
        f"engine: {report['engine']}\n"
        f"matmul peak fp32 {report['matmul_gflops_start']['fp32']:.0f} GFLOP/s at start, "
        f"{report['matmul_gflops_end']['fp32']:.0f} at end; load average "
        f"{machine['load_average_at_start'][0]:.1f} -> {report['load_average_at_end'][0]:.1f}\n"
    )
    print(f"peak RSS after loading the engine: {report['rss_after_engine_load_mb']:.0f} MiB\n")
    print("| slices | " + " | ".join(STAGES) + " | model ms/slice | peak RSS MiB |")
    print("|---" * (len(STAGES) + 3) + "|")
    for n, row in report["infer"].items():
        cells = " | ".join(f"{row['median_ms'][s]:.0f}" for s in STAGES)
        print(f"| {n} | {cells} | {row['model_ms_per_slice']:.0f} | {row['peak_rss_mb']:.0f} |")
    print(f"\nfresh `radnet-node infer` process on 32 slices: {report['cli_wall_s_32']:.1f} s wall")
    if "cpu_modes" in report:
        print("\n| precision | channels_last | slices/call | threads | model ms/slice |")
        print("|---|---|---|---|---|")
        for mode in report["cpu_modes"]:
            print(
                f"| {mode['precision']} | {mode['channels_last']} | {mode['chunk_slices']} | "
                f"{mode['threads']} | {mode['ms_per_slice']:.1f} |"
            )
    if report["bf16_vs_fp32"]:
        print(f"\nbf16 vs fp32: {report['bf16_vs_fp32']}")


if __name__ == "__main__":
    raise SystemExit(main())
