"""RADnet benchmark: inference and training throughput against this machine's matmul peak.

Run ``python benchmarks/bench_model.py [--quick] [--json out.json]``; it prints a Markdown table and
writes the same figures as JSON. Every figure is a median over interleaved rounds, measured in the
same run as the matmul peak it is compared with.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from radnet_node.model import (
    RADnet,
    build_model,
    count_parameters,
    measure_flops_per_slice,
)


@dataclass(frozen=True)
class InferenceMode:
    """One way of running inference: memory format, autocast, and the dense-block path."""

    name: str
    channels_last: bool
    bf16: bool
    concat_path: bool  # force the autograd-compatible concatenation path instead of the buffer


@dataclass(frozen=True)
class InferenceResult:
    """Median latency of one mode and its throughput as a share of the matmul peak."""

    name: str
    ms_per_slice: float
    gflops_per_s: float
    percent_of_peak: float
    peak_reference: str


@dataclass(frozen=True)
class TrainingResult:
    """Median SGD-step time on one sequence, with the auxiliary losses at full resolution."""

    name: str
    slices_per_step: int
    s_per_step: float
    slices_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            fields = dict(line.split(":", 1) for line in cpuinfo if ":" in line and line[0] != "\n")
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name\t", platform.machine()).strip()
    family = fields.get("cpu family\t", "?").strip()
    return f"{name}, family {family}, {os.cpu_count()} logical CPUs"


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int, size: int) -> float:
    """Best GFLOP/s of a square matmul (2 n^3 FLOPs) over ``repeats`` runs."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _calibrate_batch_norm(model: RADnet, slices: torch.Tensor) -> None:
    """Give batch norm realistic running statistics so that probabilities are not saturated."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration passes
    with torch.no_grad():
        for index in range(slices.shape[1]):
            model(slices[:, index : index + 1])
    model.eval()


def synthetic_slices(count: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1] with a bright disc, shaped (1, count, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((count, 1, size // 8, size // 8), generator=generator)
    smooth = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    grid = torch.linspace(-1, 1, size)
    disc = ((grid[None, :] ** 2 + grid[:, None] ** 2) < 0.6).float()
    return (0.6 * disc + 0.4 * smooth[:, 0]).clamp(0, 1).unsqueeze(0)


def _flops_in_training_mode(model: RADnet, input_size: int) -> float:
    """FLOPs of one slice in training mode (transition conv before pooling), on a copy."""
    clone = copy.deepcopy(model).train()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        clone(torch.zeros((1, 1, input_size, input_size), device=next(clone.parameters()).device))
    return float(counter.get_total_flops())


@contextlib.contextmanager
def _inference_context(mode: InferenceMode, device: torch.device) -> Iterator[None]:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.bf16)
    if mode.concat_path:
        # No tensor requires grad, so autograd records nothing; grad mode only selects the
        # concatenation path of the dense blocks, as in plain eager DenseNet code.
        with torch.enable_grad(), autocast:
            yield
    else:
        with torch.inference_mode(), autocast:
            yield


def bench_inference(
    model: RADnet,
    modes: list[InferenceMode],
    slice_: torch.Tensor,
    rounds: int,
    device: torch.device,
) -> dict[str, float]:
    """Median seconds per one-slice forward for each mode, the modes interleaved round by round."""
    inputs = {
        mode.name: slice_.contiguous(
            memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format
        )
        for mode in modes
    }
    times: dict[str, list[float]] = {mode.name: [] for mode in modes}

    def run(mode: InferenceMode) -> float:
        model.to(
            memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format
        )
        with _inference_context(mode, device):
            _sync(device)
            start = time.perf_counter()
            model(inputs[mode.name])
            _sync(device)
            return time.perf_counter() - start

    for mode in modes:
        for _ in range(2):
            run(mode)
    for _ in range(rounds):
        for mode in modes:
            times[mode.name].append(run(mode))
    model.to(memory_format=torch.contiguous_format)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass(frozen=True)
class Bf16Difference:
    """How far bf16 autocast moves the outputs from fp32 on one sequence."""

    max_abs_slice_probability: float
    max_abs_slice_logit: float
    slice_logit_range: tuple[float, float]
    max_abs_aux_probability: float


def bf16_difference(model: RADnet, slices: torch.Tensor, channels_last: bool) -> Bf16Difference:
    """Compare bf16-autocast and fp32 outputs (slice and auxiliary) on one sequence."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    with torch.inference_mode():
        reference = model(slices)
        with torch.autocast(slices.device.type, dtype=torch.bfloat16):
            low = model(slices)
    model.to(memory_format=torch.contiguous_format)
    assert reference.aux_logits is not None and low.aux_logits is not None
    logits, low_logits = reference.slice_logits, low.slice_logits.float()
    aux = max(
        float((torch.sigmoid(a) - torch.sigmoid(b.float())).abs().max())
        for a, b in zip(reference.aux_logits, low.aux_logits, strict=True)
    )
    return Bf16Difference(
        max_abs_slice_probability=float(
            (torch.sigmoid(logits) - torch.sigmoid(low_logits)).abs().max()
        ),
        max_abs_slice_logit=float((logits - low_logits).abs().max()),
        slice_logit_range=(float(logits.min()), float(logits.max())),
        max_abs_aux_probability=aux,
    )


def bench_training(
    name: str,
    slices: torch.Tensor,
    *,
    bf16: bool,
    channels_last: bool,
    steps: int,
    device: torch.device,
) -> TrainingResult:
    """Median time of an SGD step (forward, slice loss + 3 auxiliary losses, backward, update)."""
    torch.manual_seed(0)
    model = build_model("radnet").to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = slices.contiguous(memory_format=memory_format)
    count = x.shape[1]
    labels = (torch.arange(count, device=device) % 2).float().unsqueeze(0)
    masks = (x > 0.7).float()

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(x)
        loss = F.binary_cross_entropy_with_logits(output.slice_logits.float(), labels)
        assert output.aux_logits is not None
        for aux in output.aux_logits:
            loss = loss + F.binary_cross_entropy_with_logits(aux.float(), masks)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    step()
    seconds = statistics.median(step() for _ in range(steps))
    return TrainingResult(
        name=name, slices_per_step=count, s_per_step=seconds, slices_per_s=count / seconds
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a Markdown report and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and training steps")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--input-size", type=int, default=250)
    parser.add_argument("--train-slices", type=int, default=8)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 8 if args.quick else 25
    train_steps = 2 if args.quick else 4
    bf16 = _bf16_supported(device)
    matmul_size = 1024 if args.quick else 2048

    load_start = os.getloadavg()[0]
    peak_fp32 = measure_matmul_peak(torch.float32, device, 5, matmul_size)
    peak_bf16 = measure_matmul_peak(torch.bfloat16, device, 5, matmul_size) if bf16 else None

    model = build_model("radnet").to(device)
    parameters = count_parameters(model)
    sequence = synthetic_slices(args.train_slices, args.input_size, seed=1).to(device)
    _calibrate_batch_norm(model, sequence)
    flops_train_order = _flops_in_training_mode(model, args.input_size)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    flops = measure_flops_per_slice(model, args.input_size)

    modes = [
        InferenceMode("fp32 NCHW, eager concat", False, False, True),
        InferenceMode("fp32 NCHW", False, False, False),
        InferenceMode("fp32 channels_last", True, False, False),
    ]
    if bf16:
        modes += [
            InferenceMode("bf16 autocast NCHW", False, True, False),
            InferenceMode("bf16 autocast + channels_last", True, True, False),
        ]
    seconds = bench_inference(model, modes, sequence[:, :1], rounds, device)
    inference = []
    for mode in modes:
        peak, reference = (peak_bf16, "bf16") if mode.bf16 else (peak_fp32, "fp32")
        achieved = flops / seconds[mode.name] / 1e9
        inference.append(
            InferenceResult(
                name=mode.name,
                ms_per_slice=seconds[mode.name] * 1e3,
                gflops_per_s=achieved,
                percent_of_peak=100 * achieved / peak if peak else float("nan"),
                peak_reference=reference,
            )
        )
    difference = bf16_difference(model, sequence, channels_last=True) if bf16 else None
    rss_after_inference = _peak_rss_mib()
    del model

    training = [
        bench_training(
            name, sequence, bf16=low, channels_last=last, steps=train_steps, device=device
        )
        for name, low, last in (
            ("fp32 NCHW", False, False),
            ("fp32 channels_last", False, True),
            ("bf16 autocast + channels_last", True, True),
        )
        if bf16 or not low
    ]
    rss_end = _peak_rss_mib()
    # The same matmul again: when it is much slower than at the start, another process took cores
    # during the run and the figures above are not this machine's.
    peak_fp32_end = measure_matmul_peak(torch.float32, device, 5, matmul_size)
    load_end = os.getloadavg()[0]
    contended = peak_fp32_end < 0.8 * peak_fp32 or max(load_start, load_end) > args.threads + 0.5

    cpu = _cpu_name()
    lines = [
        f"## bench_model ({'quick' if args.quick else 'full'}; torch {torch.__version__}; "
        f"{device.type}, {args.threads} threads; {cpu})",
        "",
        f"- RADnet default config: {parameters:,} parameters; "
        f"{flops_train_order / 1e9:.2f} GFLOP/slice as trained (conv -> dropout -> pool), "
        f"{flops / 1e9:.2f} GFLOP/slice at inference (pool before the transition 1x1 conv), "
        f"{args.input_size} px, aux heads included, FlopCounterMode (multiply-add = 2)",
        f"- matmul peak ({matmul_size}^2): fp32 {peak_fp32:.0f} GFLOP/s"
        + (f", bf16 {peak_bf16:.0f} GFLOP/s" if peak_bf16 else ", bf16 not supported")
        + f"; fp32 again at the end {peak_fp32_end:.0f} GFLOP/s; "
        f"load average {load_start:.2f} at start, {load_end:.2f} at end",
        "",
        "| inference, 1 slice per call | ms/slice | GFLOP/s | % of peak |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {r.ms_per_slice:.1f} | {r.gflops_per_s:.1f} | "
        f"{r.percent_of_peak:.1f} % of {r.peak_reference} |"
        for r in inference
    ]
    lines += [
        "",
        f"| training, SGD step on a {args.train_slices}-slice sequence, 3 aux losses "
        "| s/step | slices/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r.name} | {r.s_per_step:.2f} | {r.slices_per_s:.2f} |" for r in training]
    lines.append("")
    if difference is not None:
        low_logit, high_logit = difference.slice_logit_range
        lines.append(
            f"- bf16 autocast vs fp32 (channels_last, {args.train_slices} synthetic slices, random "
            f"weights, BN calibrated): max |diff| slice probability "
            f"{difference.max_abs_slice_probability:.2e}, slice logit "
            f"{difference.max_abs_slice_logit:.2e} "
            f"(logits in [{low_logit:.3f}, {high_logit:.3f}]), "
            f"aux pixel probability {difference.max_abs_aux_probability:.2e}"
        )
    lines.append(
        f"- peak RSS: {rss_after_inference:.0f} MiB after inference, "
        f"{rss_end:.0f} MiB after training"
    )
    if contended:
        lines.append(
            "- WARNING: other processes competed for the CPU during this run (load average or "
            "end-of-run matmul); rerun on a quiet machine before quoting these figures"
        )
    print("\n".join(lines))

    if args.json:
        report = {
            "quick": args.quick,
            "torch": torch.__version__,
            "device": device.type,
            "threads": args.threads,
            "input_size": args.input_size,
            "parameters": parameters,
            "flops_per_slice_train_order": flops_train_order,
            "flops_per_slice_inference": flops,
            "cpu": cpu,
            "matmul_peak_gflops": {"fp32": peak_fp32, "bf16": peak_bf16, "fp32_end": peak_fp32_end},
            "load_average": {"start": load_start, "end": load_end},
            "contended": contended,
            "inference": [asdict(r) for r in inference],
            "training": [asdict(r) for r in training],
            "bf16_vs_fp32": None if difference is None else asdict(difference),
            "peak_rss_mib": {"after_inference": rss_after_inference, "end": rss_end},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
