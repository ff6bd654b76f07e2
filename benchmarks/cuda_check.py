"""The engine on CUDA against the CPU, on the same series: do they agree, and how fast is each.

Run ``python benchmarks/cuda_check.py SERIES_DIR [SERIES_DIR ...] [--json out.json]`` on a machine
with a GPU. Every folder holds the DICOM files of one series. Each series is read and
prepared once, then run by two engines: the CPU in fp32 (the reference) and CUDA as the node runs it
there (``precision="auto"``: bf16 autocast, channels_last, 32 slices per CNN call). It prints, per
series, the largest per-slice probability difference, whether the CT decisions agree, the Dice of
the two hemorrhage masks on the source grid and the volumes, and the time per slice on each device
of ``engine.run`` (model and post-processing) and of the model alone (medians of the timed runs
after a warm-up run), and for CUDA alone those times for a batch of all the series at several
slices per call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radnet_node.engine import Engine, EngineSettings, LoadedSeries
from radnet_node.results import SeriesResult
from radnet_node.series import scan_paths
from training.inference import dice_score


def timed_runs(
    engine: Engine, series: list[LoadedSeries], repeats: int
) -> tuple[list[SeriesResult], float, float]:
    """Run once to warm up, then ``repeats`` times.

    Returns the last results and the medians over the timed runs of the ms per slice of the whole
    ``engine.run`` (model and post-processing: mapping the mask back to the source grid) and of
    the model alone (the engine's own ``model`` timing, taken after a CUDA synchronisation).
    """
    results = engine.run(series)
    slices = sum(len(s.prepared.slices) for s in series)
    run_ms, model_ms = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.run(series)
        run_ms.append((time.perf_counter() - start) * 1000.0 / slices)
        model_ms.append(sum(r.timings_ms["model"] for r in results) / slices)
    return results, statistics.median(run_ms), statistics.median(model_ms)


def compare(cpu: SeriesResult, cuda: SeriesResult) -> dict[str, Any]:
    diff = np.abs(np.asarray(cpu.slice_probabilities) - np.asarray(cuda.slice_probabilities))
    return {
        "slices": len(cpu.slice_probabilities),
        "max_abs_probability_difference": float(diff.max()),
        "ct_positive_cpu": cpu.ct_positive,
        "ct_positive_cuda": cuda.ct_positive,
        "decisions_agree": cpu.ct_positive == cuda.ct_positive,
        "positive_slices_cpu": list(cpu.positive_slice_indices),
        "positive_slices_cuda": list(cuda.positive_slice_indices),
        "mask_dice_cpu_vs_cuda": (
            dice_score(cpu.hemorrhage_mask, cuda.hemorrhage_mask)
            if cpu.hemorrhage_mask.any() or cuda.hemorrhage_mask.any()
            else None
        ),
        "volume_ml_cpu": cpu.hemorrhage_volume_ml,
        "volume_ml_cuda": cuda.hemorrhage_volume_ml,
        "max_probability_cpu": float(np.max(cpu.slice_probabilities)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", type=Path, help="folders, one series each")
    parser.add_argument("--weights", default="shipped")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; nothing to compare", file=sys.stderr)
        return 2
    cpu = Engine(EngineSettings(weights=args.weights, device="cpu", precision="fp32"))
    cuda = Engine(EngineSettings(weights=args.weights, device="cuda"))
    groups = [scan_paths([path]).series for path in args.series]
    for path, found in zip(args.series, groups, strict=True):
        if len(found) != 1:
            print(f"cuda_check: {path}: {len(found)} series found, expected 1", file=sys.stderr)
            return 2
    loaded = [cpu.load(found.paths, series_label=found.label) for (found,) in groups]
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(0),
            "cpu_threads": torch.get_num_threads(),
        },
        "cpu_engine": cpu.describe(),
        "cuda_engine": cuda.describe(),
        "series": {},
    }
    for path, item in zip(args.series, loaded, strict=True):
        cpu_result, cpu_run, cpu_model = timed_runs(cpu, [item], max(1, args.repeats // 2))
        cuda_result, cuda_run, cuda_model = timed_runs(cuda, [item], args.repeats)
        row = compare(cpu_result[0], cuda_result[0])
        row["ms_per_slice_cpu_fp32"] = {"run": cpu_run, "model": cpu_model}
        row["ms_per_slice_cuda"] = {"run": cuda_run, "model": cuda_model}
        report["series"][str(path)] = row
    batch = {}
    for chunk in (8, 32, 128):
        engine = Engine(EngineSettings(weights=args.weights, device="cuda", chunk_slices=chunk))
        _, run_ms, model_ms = timed_runs(engine, loaded, args.repeats)
        batch[str(chunk)] = {"run": run_ms, "model": model_ms}
    report["cuda_batch_all_series_ms_per_slice_by_chunk"] = batch
    report["cuda_peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    agree = all(r["decisions_agree"] for r in report["series"].values())
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
