"""Shared by training and evaluation: device/precision resolution, whole-series prediction, metrics.

One code path scores a model during training (validation each epoch) and in ``radnet-eval``, so the
numbers in history.jsonl and in the evaluation report mean the same thing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score

from radnet_node.engine import cpu_supports_bf16
from radnet_node.model import RADnet
from radnet_node.postprocess import ct_decision, ct_score, longest_positive_run, slices_needed

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: device, autocast precision, memory format, threads."""

    device: torch.device
    precision: Precision
    channels_last: bool
    threads: int

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 needs loss scaling; bf16 has fp32's exponent range and does not."""
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for this runtime (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "threads": self.threads,
        }


def resolve_runtime(
    device: Literal["auto", "cpu", "cuda"],
    precision: Literal["auto", "fp32", "bf16", "fp16"],
    *,
    channels_last: bool = True,
    threads: int | None = None,
) -> Runtime:
    """Pick the device and precision the configuration asks for, checking they are available.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        "auto" takes CUDA when present.
    precision : {"auto", "fp32", "bf16", "fp16"}
        "auto": bf16 on a CPU with native bf16, else fp32; on CUDA bf16 where supported, else fp16.
    channels_last : bool
        Run convolutions in NHWC (faster with oneDNN and on tensor cores).
    threads : int or None
        torch intra-op threads; ``None`` uses every core this process may run on.

    Returns
    -------
    Runtime

    Raises
    ------
    ValueError
        If CUDA is requested but absent, or fp16 is requested on a CPU, or bf16 on a CPU without it.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    dev = torch.device(
        "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if precision == "auto":
        if dev.type == "cuda":
            chosen: Precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            chosen = "bf16" if cpu_supports_bf16() else "fp32"
    else:
        chosen = precision
    if dev.type == "cpu" and chosen == "fp16":
        raise ValueError("precision 'fp16' is for CUDA; use 'bf16' or 'fp32' on a CPU")
    if dev.type == "cpu" and chosen == "bf16" and not cpu_supports_bf16():
        raise ValueError("precision 'bf16' requested but this CPU has no native bf16 support")
    n_threads = threads if threads is not None else len(os.sched_getaffinity(0))
    return Runtime(device=dev, precision=chosen, channels_last=channels_last, threads=n_threads)


@dataclass(frozen=True)
class SeriesPrediction:
    """Model output for one whole series."""

    slice_probabilities: np.ndarray  # (n,) float32
    aux_probabilities: (
        np.ndarray | None
    )  # (n, H, W) float32 from the finest head (block 1), or None


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def predict_series(
    model: RADnet, image: np.ndarray, runtime: Runtime, *, chunk: int = 4, with_aux: bool = True
) -> SeriesPrediction:
    """Run the model on a whole series: slices in chunks through the CNN, then the sequence model.

    Parameters
    ----------
    model : RADnet
        Put in eval mode by the caller.
    image : np.ndarray
        (n, H, W) preprocessed slices in [0, 1], ordered along the slice normal.
    runtime : Runtime
        Device and precision.
    chunk : int
        Slices per ``encode_slices`` call (memory bound, not accuracy).
    with_aux : bool
        Also return the finest auxiliary head's probabilities (for Dice).

    Returns
    -------
    SeriesPrediction

    Raises
    ------
    ValueError
        If ``image`` is not (n, H, W) with n >= 1.
    """
    if image.ndim != 3 or image.shape[0] < 1:
        raise ValueError(f"expected a series of shape (n, H, W), got {image.shape}")
    features = []
    aux_maps: list[np.ndarray] = []
    want_aux = with_aux and model.config.has_aux
    for part in _chunks(image.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(image[part], dtype=np.float32))[:, None]
        x = x.to(runtime.device)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            feats, aux = model.encode_slices(x, with_aux=want_aux)
        features.append(feats.float())
        if aux is not None:
            aux_maps.append(torch.sigmoid(aux[0].float())[:, 0].cpu().numpy())
    with runtime.autocast():
        logits = model.classify_sequence(torch.cat(features)[None])
    probabilities = torch.sigmoid(logits.float())[0].cpu().numpy().astype(np.float32)
    return SeriesPrediction(
        slice_probabilities=probabilities,
        aux_probabilities=np.concatenate(aux_maps) if aux_maps else None,
    )


def dice_score(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient of two binary volumes; 1.0 when both are empty."""
    p = np.asarray(predicted, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


@dataclass(frozen=True)
class CaseResult:
    """Everything the metrics need from one evaluated CT (no images kept)."""

    case_id: str
    ct_label: int
    slice_probabilities: np.ndarray
    slice_labels: np.ndarray  # int8, -1 unknown
    dice: float | None  # per-CT Dice of the finest aux head at 0.5, for CTs whose mask has blood
    reader_labels: Mapping[str, int] = field(default_factory=dict)
    slice_spacing_mm: float = math.nan  # median along the normal, for the millimetre rule

    def slices_needed(self, min_consecutive: int, min_extent_mm: float | None) -> int:
        """Consecutive positive slices this CT needs (``postprocess.slices_needed``)."""
        return slices_needed(min_consecutive, min_extent_mm, self.slice_spacing_mm)


def score_case(
    case_id: str,
    ct_label: int,
    *,
    slice_labels: np.ndarray,
    mask: np.ndarray | None,
    prediction: SeriesPrediction,
    reader_labels: Mapping[str, int] | None = None,
    slice_spacing_mm: float = math.nan,
) -> CaseResult:
    """Reduce a prediction to a CaseResult (Dice computed here so masks need not be kept).

    Raises
    ------
    ValueError
        If the labels or mask do not match the number of slices predicted.
    """
    n = prediction.slice_probabilities.shape[0]
    if slice_labels.shape != (n,):
        raise ValueError(f"case {case_id}: {slice_labels.shape[0]} slice labels for {n} slices")
    dice = None
    if mask is not None and prediction.aux_probabilities is not None and mask.any():
        if mask.shape != prediction.aux_probabilities.shape:
            raise ValueError(
                f"case {case_id}: mask shape {mask.shape} differs from the prediction "
                f"{prediction.aux_probabilities.shape}"
            )
        dice = dice_score(prediction.aux_probabilities >= 0.5, mask > 0)
    return CaseResult(
        case_id=case_id,
        ct_label=int(ct_label),
        slice_probabilities=prediction.slice_probabilities,
        slice_labels=np.asarray(slice_labels, dtype=np.int8),
        dice=dice,
        reader_labels=dict(reader_labels or {}),
        slice_spacing_mm=float(slice_spacing_mm),
    )


@dataclass(frozen=True)
class BinaryMetrics:
    """CT-level confusion counts and the paper's Table 1 metrics (positive class = hemorrhage)."""

    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    recall: float
    precision: float
    f1: float

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def to_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "accuracy": self.accuracy,
            "recall": self.recall,
            "precision": self.precision,
            "f1": self.f1,
        }


def binary_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray
) -> BinaryMetrics:
    """Accuracy, recall, precision, F1 with hemorrhage (1) as the positive class.

    Undefined ratios (no predicted or no actual positives) are reported as 0.0, as scikit-learn's
    ``zero_division=0`` does.

    Raises
    ------
    ValueError
        If the arrays differ in length, are empty, or hold labels other than 0/1.
    """
    t = np.asarray(y_true, dtype=int)
    p = np.asarray(y_pred, dtype=int)
    if t.shape != p.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D label arrays, got {t.shape} and {p.shape}")
    if not (np.isin(t, (0, 1)).all() and np.isin(p, (0, 1)).all()):
        raise ValueError("labels must be 0 or 1")
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(t, p, labels=[0, 1]).ravel())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return BinaryMetrics(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=(tp + tn) / t.size,
        recall=recall,
        precision=precision,
        f1=f1,
    )


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present (undefined)."""
    if labels.size == 0 or np.unique(labels).size < 2:
        return None
    return float(roc_auc_score(labels, scores))


def known_slice_arrays(results: Sequence[CaseResult]) -> tuple[np.ndarray, np.ndarray]:
    """Slice labels and probabilities of every slice with a known label, over all cases."""
    labels = [r.slice_labels for r in results]
    probs = [r.slice_probabilities for r in results]
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    all_probs = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    known = all_labels >= 0
    return all_labels[known].astype(int), all_probs[known]


def summarize(
    results: Sequence[CaseResult],
    *,
    threshold: float = 0.5,
    min_consecutive: int = 3,
    min_extent_mm: float | None = None,
) -> dict[str, Any]:
    """Slice- and CT-level metrics of a set of evaluated CTs.

    Returns a JSON-serialisable dict: ``ct`` (Table 1 metrics and confusion counts of the decision
    rule), ``slice`` (AUC over slices with known labels and the confusion counts at ``threshold``),
    ``ct_auc`` (ROC AUC of :func:`ct_score`), ``dice`` (mean per-CT Dice over CTs with blood in
    their mask, and the count), ``short_blood`` (see :func:`short_blood_runs`) and ``cases``
    (per-CT decision, score, label).

    Raises
    ------
    ValueError
        If ``results`` is empty.
    """
    if not results:
        raise ValueError("no evaluated cases to summarize")
    y_true = np.array([r.ct_label for r in results])
    needed = [r.slices_needed(min_consecutive, min_extent_mm) for r in results]
    scores = np.array(
        [ct_score(r.slice_probabilities, k) for r, k in zip(results, needed, strict=True)]
    )
    y_pred = np.array(
        [
            ct_decision(r.slice_probabilities, threshold, k)
            for r, k in zip(results, needed, strict=True)
        ],
        dtype=int,
    )
    slice_labels, slice_probs = known_slice_arrays(results)
    slice_block: dict[str, Any] = {
        "n": int(slice_labels.size),
        "auc": _auc(slice_labels, slice_probs),
    }
    if slice_labels.size:
        slice_block.update(
            binary_metrics(slice_labels, (slice_probs >= threshold).astype(int)).to_dict()
        )
    dices = [r.dice for r in results if r.dice is not None]
    short = short_blood_runs(results, min_consecutive, min_extent_mm)
    decided = {r.case_id: int(d) for r, d in zip(results, y_pred, strict=True)}
    return {
        "threshold": threshold,
        "min_consecutive": min_consecutive,
        "min_positive_extent_mm": min_extent_mm,
        "ct": binary_metrics(y_true, y_pred).to_dict(),
        "ct_auc": _auc(y_true, scores),
        "slice": slice_block,
        "dice": {"mean": float(np.mean(dices)) if dices else None, "n": len(dices)},
        "short_blood": {
            "n": len(short),
            "missed": sum(1 for case_id in short if not decided[case_id]),
            "case_ids": short,
        },
        "cases": [
            {
                "case_id": r.case_id,
                "ct_label": r.ct_label,
                "decision": int(d),
                "ct_score": float(s),
                "slices_needed": k,
                "slice_spacing_mm": r.slice_spacing_mm
                if math.isfinite(r.slice_spacing_mm)
                else None,
                "dice": r.dice,
            }
            for r, d, s, k in zip(results, y_pred, scores, needed, strict=True)
        ],
    }


def short_blood_runs(
    results: Sequence[CaseResult], min_consecutive: int, min_extent_mm: float | None = None
) -> list[str]:
    """Positive CTs whose labelled blood never reaches the consecutive slices the rule needs
    (``min_consecutive``, more on thin slices when ``min_extent_mm`` is set).

    The paper's rule calls a CT positive only on a run of ``min_consecutive`` positive slices, so
    such a CT (a small bleed on one or two thick slices) is found only when the model also flags
    its neighbours: a ceiling on CT-level recall that no slice classifier removes. CTs with any
    unknown slice label are not judged.
    """
    return [
        r.case_id
        for r in results
        if r.ct_label == 1
        and (r.slice_labels == 1).any()
        and not (r.slice_labels < 0).any()
        and longest_positive_run(r.slice_labels == 1)
        < r.slices_needed(min_consecutive, min_extent_mm)
    ]


def selection_key(summary: Mapping[str, Any]) -> tuple[float, float]:
    """Model selection key: CT-level F1, ties broken by slice AUC (missing AUC counts as -inf)."""
    auc = summary["slice"]["auc"]
    return (float(summary["ct"]["f1"]), -math.inf if auc is None else float(auc))
