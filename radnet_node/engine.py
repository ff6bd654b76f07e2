"""The inference engine: loads verified weights once, keeps the model warm on the chosen device, and
turns prepared series into frozen :class:`~radnet_node.results.SeriesResult` objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import expit

from radnet_node.errors import ConfigError, RadnetError
from radnet_node.postprocess import ct_certainty, ct_decision, extent_setting, slices_needed
from radnet_node.preprocess import (
    HuSeries,
    PreparedSeries,
    PreprocessSpec,
    prepare_hu_series,
    read_hu_slices,
)
from radnet_node.results import ModelInfo, SeriesResult
from radnet_node.weights import ModelCard, load_model

__all__ = [
    "BF16_TOLERANCE",
    "Engine",
    "EngineSettings",
    "LoadedSeries",
    "Precision",
    "cpu_supports_bf16",
    "default_threads",
    "hemorrhage_volume_ml",
    "prepare_hu",
    "resolve_device",
]

Precision = Literal["auto", "fp32", "bf16"]

#: bf16 is accepted on a CPU only while its slice probabilities stay this close to fp32
#: (max |p_bf16 - p_fp32| over the slices of a series); benchmarks/bench_infer.py checks it.
BF16_TOLERANCE = 0.02

# Slices per encode_slices call, measured with benchmarks/bench_infer.py on the 2-core dev CPU
# (bf16 + channels_last, 250 px): 1 thread, 1 or 4 slices ~42 ms/slice, 8 slices 56 ms/slice; with
# 2 threads and a busy neighbour core 4 slices were 4x faster than 1 (fewer thread barriers).
# CUDA: batch.
_DEFAULT_CHUNK_CPU = 4
_DEFAULT_CHUNK_CUDA = 32


@dataclass(frozen=True)
class EngineSettings:
    """How the engine loads and runs the model; ``None`` means "as the model card says".

    Parameters
    ----------
    weights
        ``"shipped"`` (the package's weights) or a path to a ``.pt`` file with its card beside it.
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision
        ``"auto"``: bf16 autocast on CUDA (fp16 where bf16 is missing) and on a CPU with native
        bf16; fp32 otherwise. ``"fp32"`` or ``"bf16"`` force it.
    threshold
        Slice-level operating point in (0, 1), overriding the card's.
    min_consecutive_slices
        Consecutive positive slices for a positive CT (the paper's 3), overriding the card's.
    min_positive_extent_mm
        The positive run must also span this many millimetres, so a series needs
        ``max(min_consecutive_slices, ceil(extent / slice spacing))`` slices (more on thin
        series, where 3 slices are only a few millimetres of tissue), overriding the card's.
        ``None``: the card's rule; ``0``: off, the slice count alone.
    min_slices
        Fewest slices a series needs, overriding the card's preprocessing spec.
    threads
        torch intra-op threads (process-wide); ``None``: every core this process may use but one
        (at least 1), leaving a core for DICOM I/O. On the 2-core dev machine with another busy
        process, 2 threads were up to 40x slower than 1 (threads spin-waiting on a taken core).
    chunk_slices
        Slices per CNN call; ``None``: 4 on a CPU, 32 on CUDA (see benchmarks/bench_infer.py).
    channels_last
        Run the convolutions in NHWC; ``None``: yes (CPU bf16: 42 against 62 ms/slice NCHW).

    Raises
    ------
    ConfigError
        If a value is out of range; the message names the field.
    """

    weights: str | Path = "shipped"
    device: str = "auto"
    precision: Precision = "auto"
    threshold: float | None = None
    min_consecutive_slices: int | None = None
    min_positive_extent_mm: float | None = None
    min_slices: int | None = None
    threads: int | None = None
    chunk_slices: int | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: {self.precision!r} is not one of auto, fp32, bf16")
        _parse_device(self.device)
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"threshold: must lie strictly between 0 and 1, got {self.threshold}")
        if self.min_positive_extent_mm:  # None (the card's) and 0 (off) need no check
            try:  # the rule's own check, named as this setting
                slices_needed(1, self.min_positive_extent_mm, math.nan)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"min_positive_extent_mm: {exc}") from exc
        for name in ("min_consecutive_slices", "min_slices", "threads", "chunk_slices"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


@dataclass(frozen=True, eq=False)
class LoadedSeries:
    """A series read from DICOM and prepared for the model, with the HU it came from.

    ``hu`` stays available for what needs source pixels after inference (key image, preview).
    """

    hu: HuSeries
    prepared: PreparedSeries
    timings_ms: Mapping[str, float] = field(default_factory=dict)


def _parse_device(device: str) -> tuple[str, int | None]:
    text = str(device).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ConfigError(f"device: {device!r} is not auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> torch.device:
    """The torch device for a device setting.

    Raises
    ------
    ConfigError
        If the setting is malformed, or CUDA (or that CUDA index) is requested but absent.
    """
    kind, index = _parse_device(device)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(f"device: {device!r} requested but torch sees {count} CUDA device(s)")
    return torch.device("cuda", index if index is not None else torch.cuda.current_device())


def default_threads() -> int:
    """Every core this process may run on but one (at least 1): one is left for DICOM I/O."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def cpu_supports_bf16() -> bool:
    """Whether bf16 autocast runs natively on this CPU (AVX512-BF16 or AMX), checked by a tiny try.

    Without native instructions oneDNN emulates bf16 and it is slower than fp32, so "auto" only
    picks bf16 where the CPU has them. Training uses the same check.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and "AMX" not in capability:
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = handle.read()
        if "avx512_bf16" not in flags and "amx_bf16" not in flags:
            return False
    except OSError:
        pass  # not Linux: trust oneDNN's answer above
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3))
    except RuntimeError:
        return False
    return bool(probe.dtype == torch.bfloat16 and torch.isfinite(probe).all())


def _resolve_precision(precision: Precision, device: torch.device) -> str:
    if device.type == "cuda":
        if precision == "fp32":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16" and not cpu_supports_bf16():
        raise ConfigError("precision: 'bf16' requested but this CPU has no native bf16 support")
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return precision


def hemorrhage_volume_ml(
    mask: np.ndarray, pixel_spacing_mm: tuple[float, float], slice_spacing_mm: np.ndarray
) -> float:
    """Volume of a mask on the source grid: sum of pixels x pixel area x slice spacing, in mL.

    Parameters
    ----------
    mask
        (n, rows, columns) bool.
    pixel_spacing_mm
        (between rows, between columns).
    slice_spacing_mm
        (n,) thickness each slice stands for (``PreparedSeries.slice_spacing_mm``).

    Returns
    -------
    float
        mL (1 mL = 1000 mm^3); 0.0 for an empty mask; NaN when a slice with mask pixels has an
        unknown spacing.

    Raises
    ------
    ValueError
        If the shapes disagree.
    """
    spacing = np.asarray(slice_spacing_mm, dtype=np.float64)
    if mask.ndim != 3 or spacing.shape != (mask.shape[0],):
        raise ValueError(
            f"mask (n, rows, columns) and slice spacing (n,) disagree: {mask.shape}, "
            f"{spacing.shape}"
        )
    pixels = mask.reshape(mask.shape[0], -1).sum(axis=1)
    used = pixels > 0
    if not used.any():
        return 0.0
    area = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    return float(np.sum(pixels[used] * area * spacing[used]) / 1000.0)


class Engine:
    """RADnet loaded once from verified weights and kept warm; runs batches of series.

    Parameters
    ----------
    settings
        Weights, device, precision and decision-rule overrides.

    Raises
    ------
    WeightsError
        The weights or card are missing, corrupt, or do not match (sha256, strict load).
    ConfigError
        The device or precision cannot be had on this machine.
    """

    def __init__(self, settings: EngineSettings = EngineSettings()) -> None:  # noqa: B008 (frozen)
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.precision = _resolve_precision(settings.precision, self.device)
        torch.set_num_threads(settings.threads or default_threads())
        model, card = load_model(settings.weights, map_location="cpu")
        self.card: ModelCard = card
        self.channels_last = True if settings.channels_last is None else settings.channels_last
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.eval()
        self._model = model
        self.chunk_slices = settings.chunk_slices or (
            _DEFAULT_CHUNK_CUDA if self.device.type == "cuda" else _DEFAULT_CHUNK_CPU
        )
        spec = card.preprocess_spec
        if settings.min_slices is not None:
            spec = dataclasses.replace(spec, min_slices=settings.min_slices)
        self.spec: PreprocessSpec = spec
        self.threshold = float(
            settings.threshold if settings.threshold is not None else card.threshold
        )
        self.min_consecutive = int(
            settings.min_consecutive_slices
            if settings.min_consecutive_slices is not None
            else card.min_consecutive_slices
        )
        self.min_extent_mm = extent_setting(
            card.min_positive_extent_mm, settings.min_positive_extent_mm
        )
        self.model_info = ModelInfo(
            name=card.name, version=card.version, variant=card.variant, sha256=card.sha256
        )

    def describe(self) -> dict[str, Any]:
        """Device, precision and decision rule in use (for logs and result.json)."""
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "chunk_slices": self.chunk_slices,
            "threads": torch.get_num_threads(),
            "threshold": self.threshold,
            "min_consecutive_slices": self.min_consecutive,
            "min_positive_extent_mm": self.min_extent_mm,
        }

    # ------------------------------------------------------------------------------------------
    # reading and preprocessing

    def load(
        self, instances: Sequence[str | Path | Any], *, series_label: str | None = None
    ) -> LoadedSeries:
        """Read, decode and prepare one series with the model card's preprocessing.

        Parameters
        ----------
        instances
            Paths or datasets of every instance of the series.
        series_label
            Name used in errors.

        Returns
        -------
        LoadedSeries
            With ``read_decode`` and ``preprocess`` timings in ms.

        Raises
        ------
        InputError, SeriesError
            As :func:`radnet_node.preprocess.prepare_series`, including a non-axial series.
        """
        start = time.perf_counter()
        hu = read_hu_slices(instances, self.spec, series_label=series_label)
        read_ms = (time.perf_counter() - start) * 1000.0
        start = time.perf_counter()
        prepared = prepare_hu(hu, self.spec)
        prep_ms = (time.perf_counter() - start) * 1000.0
        return LoadedSeries(
            hu=hu, prepared=prepared, timings_ms={"read_decode": read_ms, "preprocess": prep_ms}
        )

    # ------------------------------------------------------------------------------------------
    # inference

    def run(self, series: Sequence[PreparedSeries | LoadedSeries]) -> list[SeriesResult]:
        """Run RADnet on a batch of series and post-process each.

        The slices of all series go through the CNN in chunks of ``chunk_slices`` (on CUDA a chunk
        mixes series; each slice is encoded independently, so results do not depend on the
        batching); then the LSTM runs over each series' own slices. The hemorrhage mask is the
        finest auxiliary head (block 1) above 0.5 on the model grid, mapped to the source grid
        (linear, >= 0.5) and kept only on slices called positive; it is empty for a CT called
        negative, so an SR saying "Absent" and the SEG agree. The model time of a batch is shared
        out to its series by slice count.

        Parameters
        ----------
        series
            Prepared series (from :meth:`load` or ``prepare_series`` with :attr:`spec`).

        Returns
        -------
        list of SeriesResult
            One per series, in the given order; timings in ms: ``model`` and ``postprocess``, plus
            ``read_decode`` and ``preprocess`` for a :class:`LoadedSeries`.

        Raises
        ------
        ValueError
            If a series was prepared with another matrix size than this model's spec.
        RadnetError
            If CUDA runs out of memory even at one slice per call.
        """
        prepared = [s.prepared if isinstance(s, LoadedSeries) else s for s in series]
        upstream = [dict(s.timings_ms) if isinstance(s, LoadedSeries) else {} for s in series]
        if not prepared:
            return []
        size = self.spec.matrix_size
        for item in prepared:
            if item.image.shape[1:] != (size, size):
                raise ValueError(
                    f"series {item.series_instance_uid}: prepared at {item.image.shape[1:]}, "
                    f"the model expects {size} x {size} (prepare with engine.spec)"
                )
        start = time.perf_counter()
        features, masks = self._encode_all(prepared)
        logits = self._classify(features)
        self._synchronize()
        model_ms = (time.perf_counter() - start) * 1000.0
        total_slices = sum(len(p.slices) for p in prepared)

        results = []
        for item, series_logits, mask, timings in zip(
            prepared, logits, masks, upstream, strict=True
        ):
            start = time.perf_counter()
            result = self._postprocess(item, series_logits, mask)
            timings["model"] = model_ms * len(item.slices) / total_slices
            timings["postprocess"] = (time.perf_counter() - start) * 1000.0
            results.append(dataclasses.replace(result, timings_ms=timings))
        return results

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _encode_all(
        self, prepared: Sequence[PreparedSeries]
    ) -> tuple[list[torch.Tensor], list[np.ndarray | None]]:
        """Pooled features (n, C) and finest-head masks (n, N, N) bool per series."""
        counts = [len(p.slices) for p in prepared]
        total = sum(counts)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        has_aux = self._model.config.has_aux
        size = self.spec.matrix_size
        features = torch.empty((total, self._model.config.feature_channels), dtype=torch.float32)
        masks = np.zeros((total, size, size), dtype=bool) if has_aux else None
        chunk = self.chunk_slices
        position = 0
        while position < total:
            stop = min(total, position + chunk)
            try:
                feats, aux = self._encode_chunk(self._gather(prepared, offsets, position, stop))
            except torch.OutOfMemoryError as exc:
                # free what the failed call held before retrying with fewer slices
                del exc
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if chunk == 1:
                    raise RadnetError(
                        f"{self.device}: out of memory even at one slice per call"
                    ) from None
                chunk = max(1, chunk // 2)
                continue
            features[position:stop] = feats
            if masks is not None and aux is not None:
                masks[position:stop] = aux
            position = stop
        bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
        per_series_features = [features[a:b] for a, b in bounds]
        per_series_masks = [None if masks is None else masks[a:b] for a, b in bounds]
        return per_series_features, per_series_masks

    @staticmethod
    def _gather(
        prepared: Sequence[PreparedSeries], offsets: np.ndarray, start: int, stop: int
    ) -> np.ndarray:
        """Slices ``start:stop`` of the concatenation of all series' images."""
        pieces = []
        for index, item in enumerate(prepared):
            a, b = int(offsets[index]), int(offsets[index + 1])
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                pieces.append(item.image[lo - a : hi - a])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    @torch.inference_mode()
    def _encode_chunk(self, slices: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        # a copy: the prepared image is read-only and torch wants writable memory
        x = torch.from_numpy(np.array(slices, dtype=np.float32, copy=True))[:, None]
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            feats, aux = self._model.encode_slices(x, with_aux=True)
        # sigmoid(logit) > 0.5 exactly when logit > 0
        mask = None if aux is None else (aux[0][:, 0] > 0).cpu().numpy()
        return feats.float().cpu(), mask

    @torch.inference_mode()
    def _classify(self, features: Sequence[torch.Tensor]) -> list[np.ndarray]:
        # The LSTM and classifier are a negligible share of the time: run them in fp32.
        logits = []
        for item in features:
            out = self._model.classify_sequence(item.to(self.device)[None].float())
            logits.append(out[0].float().cpu().numpy().astype(np.float64))
        return logits

    def _postprocess(
        self, series: PreparedSeries, logits: np.ndarray, model_mask: np.ndarray | None
    ) -> SeriesResult:
        probabilities = expit(logits)
        positive = probabilities >= self.threshold
        needed = slices_needed(
            self.min_consecutive, self.min_extent_mm, series.median_slice_spacing_mm
        )
        ct_positive = ct_decision(probabilities, self.threshold, needed)
        certainty = ct_certainty(probabilities, self.threshold, needed)
        mask = np.zeros((len(series.slices), *series.source_shape), dtype=bool)
        if ct_positive and model_mask is not None:
            kept = model_mask & positive[:, None, None]
            if kept.any():
                mask = series.to_source_grid(kept.astype(np.float32), interpolation="linear") >= 0.5
        mask.setflags(write=False)
        probabilities = probabilities.astype(np.float64)
        probabilities.setflags(write=False)
        return SeriesResult(
            series=series,
            slice_probabilities=probabilities,
            threshold=self.threshold,
            min_consecutive=needed,
            ct_positive=bool(ct_positive),
            certainty=float(certainty),
            hemorrhage_mask=mask,
            hemorrhage_volume_ml=hemorrhage_volume_ml(
                mask, series.source_pixel_spacing_mm, series.slice_spacing_mm
            ),
            model=self.model_info,
        )


def prepare_hu(hu: HuSeries, spec: PreprocessSpec) -> PreparedSeries:
    """Prepare an already-read :class:`HuSeries` exactly as ``prepare_series`` would.

    ``prepare_series`` reads and prepares in one call; splitting it lets the engine time reading
    and preprocessing apart and keep the HU for the key image.

    Raises
    ------
    UnsupportedImageError
        The slice normal is more than 45 degrees from the patient's z axis.
    """
    return prepare_hu_series(hu, spec)
