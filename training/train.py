"""``radnet-train``: the paper's training recipe for RADnet and its ablation variants.

70:30 split at CT level, SGD with momentum, lr / 10 after 1/3 and 2/3 of the epochs, rotation and
flip augmentation with class-balanced sampling of slice sequences, slice BCE plus weighted auxiliary
segmentation losses; validation, checkpoints and an exact ``--resume`` at every epoch.

Sampling, exactly: every window of ``sequence_length`` consecutive slices of a training CT (stride
1; a CT with fewer slices gives one window of all its slices) is a candidate. A window is *positive*
when one of its slices is labelled blood (or, for a CT without slice labels, when the CT is
positive). Each epoch draws ``epoch_size`` windows with replacement: with probability
``positive_sequence_fraction`` (0.5) uniformly from the positive windows, else from the negative
ones, so positive windows are repeated (oversampled) until the sequences are balanced 50/50. EVERY
drawn window, positive or negative, then gets a fresh random rotation (uniform +-15 deg, one angle
for the whole sequence) and a horizontal flip (p = 0.5): the repeats of positive windows differ,
and augmentation carries no information about the class.

Labels the loss uses: in a CT labelled negative, unknown slice labels are 0 (no slice of a negative
CT holds blood) and the mask of every slice labelled 0 is known to be empty; the auxiliary loss
uses only slices whose mask is known. Slices with unknown labels do not enter the slice BCE.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import typer
from tqdm import tqdm

from radnet_node.errors import ConfigError, DatasetError, RadnetError
from radnet_node.model import RADnet, RadnetConfig
from radnet_node.preprocess import PreprocessSpec
from radnet_node.weights import card_path_for, load_model, sha256_of
from training.config import TrainConfig, load_config, validate_config
from training.datasets import Case, CaseDataset, ConcatDataset, open_dataset, stratified_split
from training.inference import (
    CaseResult,
    Runtime,
    predict_series,
    resolve_runtime,
    score_case,
    selection_key,
    summarize,
)

log = logging.getLogger("radnet.train")

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------- data in memory


@dataclass(frozen=True)
class TrainingCase:
    """One preprocessed CT as the trainer keeps it in memory."""

    case_id: str
    image: np.ndarray  # (n, N, N) float16 or float32 in [0, 1]
    slice_labels: np.ndarray  # (n,) int8: 1 blood, 0 none, -1 unknown (after the negative-CT rule)
    mask: np.ndarray | None  # (n, N, N) uint8, or None
    mask_known: np.ndarray  # (n,) bool: the slice's mask is known (given, or empty by label)
    ct_label: int
    reader_labels: dict[str, int]
    slice_spacing_mm: float = float("nan")  # median along the normal, for the millimetre rule

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[0])


HEAD_MODULES = ("lstm", "classifier")


def head_only(model: RADnet) -> None:
    """Freeze everything but the sequence head (``train.trainable = "head"``)."""
    for name, module in model.named_children():
        module.requires_grad_(name in HEAD_MODULES)


def set_train_mode(model: RADnet, config: TrainConfig) -> None:
    """``model.train()``, except that a frozen encoder stays in eval mode (batch-norm stats)."""
    if config.train.trainable == "all":
        model.train()
        return
    model.eval()
    for name, module in model.named_children():
        if name in HEAD_MODULES:
            module.train()


def head_forward(model: RADnet, images: torch.Tensor) -> torch.Tensor:
    """Slice logits with the encoder frozen: features without autograd or auxiliary heads."""
    batch, slices, height, width = (int(size) for size in images.shape)
    with torch.no_grad():
        features, _ = model.encode_slices(
            images.reshape(batch * slices, 1, height, width), with_aux=False
        )
    return model.classify_sequence(features.reshape(batch, slices, -1))


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper), or AdamW when the config asks for it."""
    if config.optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.optim.lr,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        nesterov=config.optim.nesterov,
    )


def to_training_case(
    case: Case, image_dtype: str = "float32", min_blood_pixels: int = 0
) -> TrainingCase:
    """Apply the label rules of the module docstring and store the image compactly.

    Raises
    ------
    DatasetError
        If the labels or mask do not match the image.
    """
    n = case.image.shape[0]
    labels = np.asarray(case.slice_labels, dtype=np.int8).copy()
    if labels.shape != (n,):
        raise DatasetError(f"case {case.case_id}: {labels.shape} slice labels for {n} slices")
    if case.mask is not None and case.mask.shape != case.image.shape:
        raise DatasetError(
            f"case {case.case_id}: mask shape {case.mask.shape} differs from image "
            f"{case.image.shape}"
        )
    if case.ct_label == 0:
        labels[labels < 0] = 0
    if min_blood_pixels > 0 and case.mask is not None:
        area = case.mask.reshape(n, -1).sum(axis=1)
        labels[(labels == 1) & (area < min_blood_pixels)] = -1
    mask_known = np.ones(n, bool) if case.mask is not None else labels == 0
    return TrainingCase(
        case_id=case.case_id,
        image=np.ascontiguousarray(case.image, dtype=np.dtype(image_dtype)),
        slice_labels=labels,
        mask=None if case.mask is None else np.ascontiguousarray(case.mask, dtype=np.uint8),
        mask_known=mask_known,
        ct_label=int(case.ct_label),
        reader_labels=dict(case.reader_labels),
        slice_spacing_mm=float(case.slice_spacing_mm),
    )


@dataclass(frozen=True)
class SkippedCase:
    case_id: str
    reason: str


class CaseLoader:
    """Loads cases into memory; a case that fails with DatasetError is skipped and reported.

    ``workers`` > 1 decodes and preprocesses in that many processes, started once and used by
    every :meth:`load` of this loader (a run loads its training and its validation cases through
    one pool). They are forked from a fork server that imported this module once, so no worker
    repeats the import of torch and the rest, and none is a fork of a parent that may hold a CUDA
    context; where the platform has no fork server they are spawned. On a 16-core GPU machine, 144
    cached cases took 72.5 s through a pool of 16 spawned workers and 2.9 s through this one.
    """

    def __init__(
        self, dataset: CaseDataset, image_dtype: str, *, workers: int = 1, progress: bool = True
    ) -> None:
        self.dataset = dataset
        self.image_dtype = image_dtype
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> CaseLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _started_pool(self, n_cases: int) -> ProcessPoolExecutor | None:
        if self.workers <= 1 or n_cases <= 1:
            return None
        if self._pool is None:
            # the dataset (megabytes of label tables when pickled) goes to each process once
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_loading_context(),
                initializer=_start_loading_worker,
                initargs=(self.dataset, self.image_dtype),
            )
        return self._pool

    def load(
        self, case_ids: Sequence[str], *, desc: str, min_blood_pixels: int = 0
    ) -> tuple[list[TrainingCase], list[SkippedCase]]:
        """The cases of ``case_ids`` in their order, and those skipped.

        ``min_blood_pixels`` applies the loss section's rule (training cases only: validation
        keeps every label).
        """
        cases: list[TrainingCase] = []
        skipped: list[SkippedCase] = []
        pool = self._started_pool(len(case_ids))
        if pool is not None:
            loaded: Iterable[TrainingCase | SkippedCase] = pool.map(
                _load_in_worker,
                case_ids,
                itertools.repeat(min_blood_pixels, len(case_ids)),
                chunksize=2,
            )
        else:
            loaded = (
                _load_one(self.dataset, self.image_dtype, min_blood_pixels, case_id)
                for case_id in case_ids
            )
        for item in tqdm(
            loaded,
            total=len(case_ids),
            desc=desc,
            unit="case",
            leave=False,
            file=sys.stderr,
            disable=not self.progress,
        ):
            if isinstance(item, SkippedCase):
                log.warning("skipping case %s: %s", item.case_id, item.reason)
                skipped.append(item)
            else:
                cases.append(item)
        return cases, skipped


def load_cases(
    dataset: CaseDataset,
    case_ids: Sequence[str],
    image_dtype: str,
    *,
    desc: str,
    min_blood_pixels: int = 0,
    progress: bool = True,
    workers: int = 1,
) -> tuple[list[TrainingCase], list[SkippedCase]]:
    """One :meth:`CaseLoader.load` with a loader of its own; the order of ``case_ids`` is kept."""
    with CaseLoader(dataset, image_dtype, workers=workers, progress=progress) as loader:
        return loader.load(case_ids, desc=desc, min_blood_pixels=min_blood_pixels)


def _loading_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # imported once, by the server (no effect once a server runs in this process)
    context.set_forkserver_preload(["training.train"])
    return context


def _load_one(
    dataset: CaseDataset, image_dtype: str, min_blood_pixels: int, case_id: str
) -> TrainingCase | SkippedCase:
    try:
        return to_training_case(dataset.load(case_id), image_dtype, min_blood_pixels)
    except DatasetError as error:
        return SkippedCase(case_id, str(error))


#: in a loading process: the dataset and image dtype it was started with
_worker_args: tuple[CaseDataset, str] | None = None


def _start_loading_worker(dataset: CaseDataset, image_dtype: str) -> None:
    """Each loading process uses one core (the pool has one process per core) and keeps the
    dataset it was given for all its cases."""
    global _worker_args  # noqa: PLW0603 - per-process state of a pool worker
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _worker_args = (dataset, image_dtype)


def _load_in_worker(case_id: str, min_blood_pixels: int) -> TrainingCase | SkippedCase:
    assert _worker_args is not None, "the pool's initializer sets it"
    return _load_one(*_worker_args, min_blood_pixels, case_id)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Window:
    """``length`` consecutive slices of case ``case_index`` starting at ``start``."""

    case_index: int
    start: int
    length: int
    positive: bool


def build_windows(cases: Sequence[TrainingCase], sequence_length: int) -> list[Window]:
    """Every window of ``sequence_length`` consecutive slices (stride 1) of every case."""
    windows = []
    for index, case in enumerate(cases):
        length = min(sequence_length, case.n_slices)
        blood = case.slice_labels == 1
        unknown_positive = case.ct_label == 1 and not (case.slice_labels >= 0).any()
        for start in range(case.n_slices - length + 1):
            positive = bool(blood[start : start + length].any()) or unknown_positive
            windows.append(Window(index, start, length, positive))
    return windows


def sample_windows(
    windows: Sequence[Window], count: int, positive_fraction: float | None, rng: np.random.Generator
) -> list[Window]:
    """Draw ``count`` windows; balanced by class when ``positive_fraction`` is set (see module doc).

    Falls back to uniform sampling when one class has no windows at all.
    """
    if not windows:
        raise DatasetError("no training sequences: every training case was skipped or empty")
    positives = [w for w in windows if w.positive]
    negatives = [w for w in windows if not w.positive]
    if positive_fraction is None or not positives or not negatives:
        return [windows[i] for i in rng.integers(0, len(windows), size=count)]
    drawn = []
    for is_positive in rng.random(count) < positive_fraction:
        pool = positives if is_positive else negatives
        drawn.append(pool[int(rng.integers(0, len(pool)))])
    return drawn


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, S, H, W) float32
    slice_labels: torch.Tensor  # (B, S) float32, -1 unknown or padding
    masks: torch.Tensor  # (B, S, H, W) float32
    mask_known: torch.Tensor  # (B, S) bool


def augment(
    images: torch.Tensor, masks: torch.Tensor, angle_deg: float, flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (about the image centre, which preprocessing puts on the head) and flip a sequence.

    ``images`` and ``masks`` are (S, H, W); outside the rotated image is 0 (below the window, as
    air is).
    """
    if flip:
        images = images.flip(-1)
        masks = masks.flip(-1)
    if angle_deg == 0.0:
        return images, masks
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = torch.tensor(
        [[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32, device=images.device
    )
    stacked = torch.stack([images, masks], dim=1)  # (S, 2, H, W): one sampling for both
    grid = F.affine_grid(
        matrix.expand(stacked.shape[0], 2, 3), list(stacked.shape), align_corners=False
    )
    rotated = F.grid_sample(
        stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    # a bilinearly resampled mask is a partial-volume fraction; >= 0.5 keeps it binary and unshifted
    return rotated[:, 0], (rotated[:, 1] >= 0.5).float()


def make_batch(
    cases: Sequence[TrainingCase],
    windows: Sequence[Window],
    rng: np.random.Generator,
    rotation_deg: float,
    hflip_probability: float,
    *,
    device: torch.device | None = None,
) -> Batch:
    """Stack augmented windows into a batch; shorter windows are padded at the end (label -1).

    The windows are gathered on the CPU and augmented where the batch ends up (``device``, default
    the CPU): on a GPU the rotations cost nothing beside the step. The random draws are the same
    for every device.
    """
    length = max(w.length for w in windows)
    first = cases[windows[0].case_index]
    height, width = first.image.shape[1:]
    images = torch.zeros(len(windows), length, height, width)
    masks = torch.zeros(len(windows), length, height, width)
    labels = torch.full((len(windows), length), -1.0)
    known = torch.zeros(len(windows), length, dtype=torch.bool)
    draws = []
    for row, window in enumerate(windows):
        case = cases[window.case_index]
        part = slice(window.start, window.start + window.length)
        images[row, : window.length] = torch.from_numpy(case.image[part].astype(np.float32))
        if case.mask is not None:
            masks[row, : window.length] = torch.from_numpy(case.mask[part].astype(np.float32))
        labels[row, : window.length] = torch.from_numpy(case.slice_labels[part].astype(np.float32))
        known[row, : window.length] = torch.from_numpy(case.mask_known[part])
        angle = float(rng.uniform(-rotation_deg, rotation_deg)) if rotation_deg > 0 else 0.0
        draws.append((window.length, angle, bool(rng.random() < hflip_probability)))
    if device is not None and device.type != "cpu":
        images, masks, labels, known = (
            t.pin_memory().to(device, non_blocking=True) for t in (images, masks, labels, known)
        )
    for row, (used, angle, flip) in enumerate(draws):
        images[row, :used], masks[row, :used] = augment(
            images[row, :used], masks[row, :used], angle, flip
        )
    return Batch(images, labels, masks, known)


def crop_batch(batch: Batch, size: int, rng: np.random.Generator, min_blood_pixels: int) -> Batch:
    """Crop every sequence of ``batch`` to ``size`` px squares (one window for all its slices).

    A sequence with blood is cropped around a random blood pixel (jittered by up to a quarter of the
    crop), others around a random point of the central half of the image, where the head is.
    Slice labels are re-derived from the cropped masks where a mask is known (blood outside the
    crop is not in the crop): >= ``min_blood_pixels`` px -> 1, a smaller speck -> unknown,
    none -> 0.
    The network is fully convolutional, so training on crops makes the blood a larger share of the
    globally pooled features and each step several times cheaper; the last epochs run uncropped.
    """
    _, _, height, width = batch.images.shape
    if size >= min(height, width):
        return batch
    half = size // 2
    images, masks, labels = [], [], []
    for row in range(batch.images.shape[0]):
        known = batch.mask_known[row]
        blood = (batch.masks[row] * known[:, None, None]).amax(dim=0)
        points = torch.nonzero(blood > 0)
        if len(points):
            cy, cx = (int(v) for v in points[int(rng.integers(len(points)))])
            cy += int(rng.integers(-size // 4, size // 4 + 1))
            cx += int(rng.integers(-size // 4, size // 4 + 1))
        else:
            cy = int(rng.integers(height // 4, 3 * height // 4 + 1))
            cx = int(rng.integers(width // 4, 3 * width // 4 + 1))
        top = min(max(cy - half, 0), height - size)
        left = min(max(cx - half, 0), width - size)
        mask = batch.masks[row, :, top : top + size, left : left + size]
        area = mask.flatten(1).sum(dim=1)
        label = batch.slice_labels[row].clone()
        derived = torch.where(
            area >= max(1, min_blood_pixels),
            torch.tensor(1.0),
            torch.where(area > 0, torch.tensor(-1.0), torch.tensor(0.0)),
        )
        label = torch.where(known & (label >= 0), derived, label)
        label = torch.where(~known & (label == 1), torch.tensor(-1.0), label)
        images.append(batch.images[row, :, top : top + size, left : left + size])
        masks.append(mask)
        labels.append(label)
    return Batch(torch.stack(images), torch.stack(labels), torch.stack(masks), batch.mask_known)


# ----------------------------------------------------------------------------- loss


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over all given pixels together (smoothing keeps empty targets well defined)."""
    probs = torch.sigmoid(logits)
    intersection = (probs * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (probs.sum() + target.sum() + smooth)


def compute_loss(
    slice_logits: torch.Tensor,
    aux_logits: Sequence[torch.Tensor] | None,
    batch: Batch,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Slice BCE on known labels (positive slices with little blood weighted by
    ``loss.small_blood_weight``) + sum_i w_i * (BCE_i [+ soft Dice_i]) on slices with a known mask.

    Returns the loss tensor and its parts as floats for logging.
    """
    labels = batch.slice_labels
    valid = labels >= 0
    zero = slice_logits.sum() * 0.0
    weight = None
    if config.loss.small_blood_pixels > 0 and config.loss.small_blood_weight != 1.0:
        area = batch.masks.flatten(2).sum(-1)  # (B, S) model pixels of blood, after augmentation
        small = (labels == 1) & batch.mask_known & (area < config.loss.small_blood_pixels)
        weight = torch.where(small, config.loss.small_blood_weight, 1.0)[valid]
    main = (
        F.binary_cross_entropy_with_logits(
            slice_logits.float()[valid], labels[valid], weight=weight
        )
        if valid.any()
        else zero
    )
    total = config.loss.main_weight * main
    parts = {"main": float(main.detach())}
    aux_total = zero
    if aux_logits is not None and batch.mask_known.any():
        target = batch.masks[batch.mask_known]
        for aux_weight, head in zip(config.loss.aux_weights, aux_logits, strict=True):
            if aux_weight == 0.0:
                continue
            logits = head.float()[batch.mask_known]
            head_loss = F.binary_cross_entropy_with_logits(logits, target)
            if config.loss.aux_dice:
                head_loss = head_loss + soft_dice_loss(logits, target)
            aux_total = aux_total + aux_weight * head_loss
        total = total + aux_total
    parts["aux"] = float(aux_total.detach())
    parts["loss"] = float(total.detach())
    return total, parts


# ----------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=path.name, suffix=".tmp", delete=False
    ) as handle:
        tmp = Path(handle.name)
        try:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _read_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` of our own file (numpy RNG state and plain dicts: not weights_only).

    Raises
    ------
    RadnetError
        Naming ``path`` and ``what`` it was read as, when it is missing or unreadable.
    """
    if not path.is_file():
        raise RadnetError(f"{path}: {what}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged pickle
        raise RadnetError(f"{path}: {what}: cannot read: {error}") from error


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by this trainer.

    Raises
    ------
    RadnetError
        If the file is missing, unreadable or not a radnet-train checkpoint.
    """
    data = _read_torch_file(path, "checkpoint")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise RadnetError(f"{path}: not a radnet-train checkpoint (format {CHECKPOINT_FORMAT})")
    return data


def initial_weights(path: Path, model: RADnet) -> str:
    """Load the weights of ``path`` into ``model`` (strict) and return their sha256.

    ``path`` is a radnet-train checkpoint or weights exported by ``radnet-export`` (checked
    against its model card).

    Raises
    ------
    RadnetError
        The file is missing or unreadable, or its weights do not fit ``model``'s architecture.
    """
    path = Path(path)
    if card_path_for(path).is_file():  # exported weights: load_model checks the card's sha256
        exported, card = load_model(path)  # WeightsError names the file and the problem
        state, sha256 = exported.state_dict(), card.sha256
    else:
        data = _read_torch_file(path, "train.init_from")
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise RadnetError(
                f"{path}: train.init_from: neither a radnet-train checkpoint nor exported weights"
                " with a model card beside them"
            )
        state, sha256 = data["model_state"], sha256_of(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RadnetError(
            f"{path}: train.init_from: weights do not fit the configured model: {error}"
        ) from error
    return sha256


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_validation: dict[str, Any]
    summary: dict[str, Any]


def model_config_for(config: TrainConfig) -> RadnetConfig:
    spec = preprocess_spec_for(config)
    return RadnetConfig.from_dict({**config.model.model_dump(), "input_size": spec.matrix_size})


def preprocess_spec_for(config: TrainConfig) -> PreprocessSpec:
    return PreprocessSpec(**config.preprocess.model_dump())


def open_training_data(config: TrainConfig) -> CaseDataset:
    """Open every ``data.specs`` entry (one dataset, or their concatenation).

    Raises
    ------
    ConfigError
        If no data was given.
    """
    if not config.data.specs:
        raise ConfigError("no training data: give --data SPEC (e.g. layout:/path) or data.specs")
    cache = Path(config.data.cache_dir) if config.data.cache_dir else None
    spec = preprocess_spec_for(config)
    datasets = [open_dataset(s, spec, cache) for s in config.data.specs]
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def split_cases(dataset: CaseDataset, config: TrainConfig) -> dict[str, list[str]]:
    """70:30 CT-level split (stratified), after the optional ``max_cases`` cap (also stratified).

    With ``data.keep_split`` (the split.json of an earlier run) every case listed there stays on
    its side, so adding data to a fine-tuning run never moves an earlier validation case into
    training; only the new cases are split, by the same rule.
    """
    seed = config.train.seed
    if config.data.keep_split is not None:
        return _extend_split(dataset, Path(config.data.keep_split), config)
    if config.data.max_cases is not None and len(dataset.case_ids()) > config.data.max_cases:
        fraction = config.data.max_cases / len(dataset.case_ids())
        kept, _ = stratified_split(dataset, fraction, seed)
        dataset = _Subset(dataset, kept)
    train_ids, val_ids = stratified_split(dataset, config.data.train_fraction, seed)
    return {"train": list(train_ids), "val": list(val_ids)}


def read_split(
    path: Path, what: str, sides: tuple[str, ...] = ("train", "val")
) -> dict[str, list[str]]:
    """The case ids of ``sides`` of a run's ``split.json``.

    Raises
    ------
    ConfigError
        Naming ``path`` and ``what`` it was read for, when it is not such a file.
    """
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        return {side: [str(c) for c in kept[side]] for side in sides}
    except (OSError, ValueError, KeyError, TypeError) as error:
        lists = " and ".join(f"'{side}'" for side in sides)
        raise ConfigError(
            f"{path}: {what}: not a readable split.json with {lists} lists ({error})"
        ) from error


def _extend_split(dataset: CaseDataset, path: Path, config: TrainConfig) -> dict[str, list[str]]:
    sides = read_split(path, "data.keep_split")
    case_ids = dataset.case_ids()
    present = set(case_ids)
    missing = [c for side in sides.values() for c in side if c not in present]
    if missing:
        raise ConfigError(
            f"{path}: data.keep_split lists {len(missing)} case(s) the data does not have "
            f"(e.g. {', '.join(missing[:3])}); give the same --data specs in the same order first"
        )
    assigned = set(sides["train"]) | set(sides["val"])
    new_ids = [c for c in case_ids if c not in assigned]
    if new_ids:
        new_train, new_val = stratified_split(
            _Subset(dataset, new_ids), config.data.train_fraction, config.train.seed
        )
        sides["train"] += new_train
        sides["val"] += new_val
    return sides


class _Subset:
    """A CaseDataset restricted to some case ids (for ``max_cases`` and ``keep_split``)."""

    def __init__(self, dataset: CaseDataset, case_ids: Sequence[str]) -> None:
        self.name = dataset.name
        self._dataset = dataset
        self._ids = list(case_ids)

    def case_ids(self) -> list[str]:
        return list(self._ids)

    def ct_label(self, case_id: str) -> int:
        return self._dataset.ct_label(case_id)

    def load(self, case_id: str) -> Case:
        return self._dataset.load(case_id)


def validate(
    model: RADnet, cases: Sequence[TrainingCase], runtime: Runtime, config: TrainConfig
) -> dict[str, Any]:
    """Whole-series validation of every case: :func:`training.inference.summarize` metrics."""
    model.eval()
    results: list[CaseResult] = []
    for case in cases:
        prediction = predict_series(model, case.image, runtime, chunk=config.train.eval_chunk)
        results.append(
            score_case(
                case.case_id,
                case.ct_label,
                slice_labels=case.slice_labels,
                mask=case.mask,
                prediction=prediction,
                reader_labels=case.reader_labels,
                slice_spacing_mm=case.slice_spacing_mm,
            )
        )
    return summarize(
        results,
        threshold=config.train.threshold,
        min_consecutive=config.train.min_consecutive,
        min_extent_mm=config.train.min_extent_mm,
    )


def epochs_within(
    seconds_left: float, *, done: int, seconds_per_epoch: float, final_validation_s: float
) -> int:
    """How many epochs a run that has ``done`` epochs can have in all within ``seconds_left``,
    keeping time for one last validation (never fewer than ``done``)."""
    if seconds_per_epoch <= 0.0:
        return sys.maxsize
    spare = seconds_left - final_validation_s
    return done + max(0, math.floor(spare / seconds_per_epoch))


def _shrunk_milestones(old: list[int], new: list[int], passed: int, end: int) -> list[int]:
    """The drops of a schedule re-fitted to ``end`` epochs after ``passed`` epochs: drops already
    taken stay, a drop not yet taken is never moved into the past, and none is left at or after
    the new end (where no epoch would use it)."""
    taken = sum(1 for m in old if m <= passed)
    return old[:taken] + [m for m in (max(m, passed + 1) for m in new[taken:]) if m < end]


def _milestones(config: TrainConfig, epochs: int | None = None) -> list[int]:
    """Epochs after which the learning rate drops, for a run of ``epochs`` (default: the
    configured number)."""
    epochs = config.train.epochs if epochs is None else epochs
    return sorted({round(m * epochs) for m in config.optim.milestones} - {0})


def _format_metrics(summary: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    ct = summary["ct"]
    auc = summary["slice"]["auc"]
    dice = summary["dice"]["mean"]
    return (
        f"slice AUC {'n/a' if auc is None else f'{auc:.3f}'} | CT recall {pct(ct['recall'])} "
        f"precision {pct(ct['precision'])} F1 {pct(ct['f1'])} | "
        f"Dice {'n/a' if dice is None else f'{dice:.3f}'}"
    )


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    dataset: CaseDataset | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train (or resume) one run into ``run_dir``.

    Parameters
    ----------
    config : TrainConfig
        The validated configuration (ignored on resume: the saved one is used).
    run_dir : Path
        Gets split.json, config.json, history.jsonl, summary.json and checkpoints/{last,best}.pt.
    resume : bool
        Continue from ``run_dir/checkpoints/last.pt`` exactly (same split, RNG, optimizer state).
    dataset : CaseDataset or None
        The data; ``None`` opens ``config.data.specs``.
    progress : bool
        Show tqdm bars.
    stop_after_epoch : int or None
        End this session after that epoch, leaving a run to continue with ``resume`` (for machines
        that cannot hold a whole run at once); the schedule still spans ``train.epochs``.
    time_limit_s : float or None
        Wall-clock seconds this call may take, loading included (a machine lent for a fixed
        time). After each epoch the run measures what an epoch costs; when fewer epochs than
        planned fit in the time left, it ends early and the step schedule shrinks to the epochs
        that fit (the last one is validated; so is the first, to learn what a validation costs).
        At least one epoch always runs. A run ended this way cannot be resumed (its schedule no
        longer spans ``train.epochs``); a new run can start from it (``train.init_from``).

    Returns
    -------
    TrainResult

    Raises
    ------
    RadnetError
        ConfigError for a bad configuration or an existing run without ``resume``; DatasetError when
        no usable training or validation case is left; RadnetError for an unreadable checkpoint.
    """
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(last_path)
        if state.get("ended_by_time_limit"):
            raise ConfigError(
                f"{last_path}: this run was ended by --time-limit after epoch {state['epoch']}, "
                "its step schedule shrunk to fit, so it cannot be resumed to its planned epochs; "
                "start a new run from it with --init-from"
            )
        config = _resume_config(
            validate_config(state["config"], f"{last_path} (saved config)"), config
        )
    elif last_path.exists():
        raise ConfigError(
            f"{run_dir}: holds a run already (checkpoints/last.pt); use --resume or another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    runtime = resolve_runtime(
        config.train.device,
        config.train.precision,
        channels_last=config.train.channels_last,
        threads=config.train.threads,
    )
    torch.set_num_threads(runtime.threads)
    seed_everything(config.train.seed)

    data = dataset if dataset is not None else open_training_data(config)
    split = state["split"] if state is not None else split_cases(data, config)
    if not split["train"] or not split["val"]:
        raise DatasetError(
            f"{data.name}: the split left no training or no validation case "
            f"({len(split['train'])} / {len(split['val'])}); add cases"
        )
    _write_json_atomic(run_dir / "split.json", split)
    _write_json_atomic(run_dir / "config.json", config.to_dict())

    with CaseLoader(
        data, config.train.image_dtype, workers=config.train.load_workers, progress=progress
    ) as loader:
        train_cases, skipped_train = loader.load(
            split["train"], desc="loading train", min_blood_pixels=config.loss.min_blood_pixels
        )
        val_cases, skipped_val = loader.load(split["val"], desc="loading val")
    skipped = skipped_train + skipped_val
    if not train_cases or not val_cases:
        raise DatasetError(
            f"{data.name}: no usable {'training' if not train_cases else 'validation'}"
            f" case left after skipping {len(skipped)} bad case(s)"
        )

    model = RADnet(model_config_for(config)).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if config.train.trainable == "head":
        head_only(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, config)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=_milestones(config), gamma=config.optim.gamma
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.uses_grad_scaler)

    start_epoch = 0
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_epoch = 0
    best_validation: dict[str, Any] = {}
    init_sha: str | None = None  # sha256 of train.init_from, kept so that export can check it
    if state is not None:
        model.load_state_dict(state["model_state"])
        init_sha = state.get("init_sha256")
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        scaler.load_state_dict(state["scaler_state"])
        start_epoch = int(state["epoch"])
        best_key = tuple(state["best_key"])  # type: ignore[assignment]
        best_epoch = int(state["best_epoch"])
        best_validation = state["best_validation"]
        _set_rng_states(state["rng"])
        _truncate_history(run_dir / "history.jsonl", start_epoch)
    else:
        if config.train.init_from:
            init_sha = initial_weights(Path(config.train.init_from), model)
            tqdm.write(
                f"radnet-train: initial weights {config.train.init_from} (sha256 {init_sha})",
                file=sys.stderr,
            )
        if (run_dir / "history.jsonl").exists():
            (run_dir / "history.jsonl").unlink()

    windows = build_windows(train_cases, config.train.sequence_length)
    n_train_slices = sum(c.n_slices for c in train_cases)
    epoch_size = config.train.epoch_size or max(1, n_train_slices // config.train.sequence_length)
    steps = math.ceil(epoch_size / config.train.batch_size)
    model_cfg = model.config
    started = time.monotonic()
    tqdm.write(
        f"radnet-train: {model_cfg.variant}, {len(train_cases)} train / {len(val_cases)} val cases "
        f"({n_train_slices} train slices, {sum(w.positive for w in windows)}/{len(windows)} "
        f"positive windows), {len(skipped)} skipped; {epoch_size} sequences of "
        f"{config.train.sequence_length} per epoch; {runtime.describe()}",
        file=sys.stderr,
    )

    end_epoch = config.train.epochs
    if stop_after_epoch is not None:
        end_epoch = max(start_epoch, min(end_epoch, stop_after_epoch))
    crop_epochs = (
        round(config.train.crop_fraction * config.train.epochs) if config.train.crop_size else 0
    )
    loop_started = time.monotonic()
    val_seconds = 0.0  # the last validation's cost (0 until one ran)
    val_total = 0.0  # all validations' cost in this session
    shrunk = False  # the time limit ended the run before train.epochs
    for epoch in range(start_epoch, end_epoch):
        if epoch >= end_epoch:  # a time limit shrank the run
            break
        epoch_started = time.monotonic()
        # the sampler's and augmentation's randomness depends only on (seed, epoch): resumable
        rng = np.random.default_rng([config.train.seed, epoch])
        drawn = sample_windows(windows, epoch_size, config.augment.positive_sequence_fraction, rng)
        set_train_mode(model, config)
        sums = {"loss": 0.0, "main": 0.0, "aux": 0.0}
        positive_slices = known_slices = 0
        bar = tqdm(
            range(steps),
            desc=f"epoch {epoch + 1}/{config.train.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        for step in bar:
            chosen = drawn[step * config.train.batch_size : (step + 1) * config.train.batch_size]
            batch = make_batch(
                train_cases,
                chosen,
                rng,
                config.augment.rotation_deg,
                config.augment.hflip_probability,
                device=runtime.device,
            )
            if epoch < crop_epochs:
                batch = crop_batch(batch, config.train.crop_size, rng, config.loss.min_blood_pixels)
            positive_slices += int((batch.slice_labels == 1).sum())
            known_slices += int((batch.slice_labels >= 0).sum())
            batch = Batch(
                *(
                    t.to(runtime.device, non_blocking=True)
                    for t in (batch.images, batch.slice_labels, batch.masks, batch.mask_known)
                )
            )
            images = batch.images
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                if config.train.trainable == "head":
                    slice_logits, aux_logits = head_forward(model, images), None
                else:
                    output = model(images)
                    slice_logits, aux_logits = output.slice_logits, output.aux_logits
            loss, parts = compute_loss(slice_logits, aux_logits, batch, config)
            if not math.isfinite(parts["loss"]):
                raise RadnetError(
                    f"epoch {epoch + 1} step {step + 1}: loss is {parts['loss']}; "
                    "lower optim.lr or use precision = 'fp32'"
                )
            scaler.scale(loss).backward()
            if config.optim.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, config.optim.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            for key in sums:
                sums[key] += parts[key]
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}")
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train_seconds = time.monotonic() - epoch_started
        if deadline is not None:
            fitted = epochs_within(
                deadline - time.monotonic(),
                done=epoch + 1,
                seconds_per_epoch=(time.monotonic() - loop_started - val_total)
                / (epoch + 1 - start_epoch)
                + val_seconds / config.train.val_every,
                final_validation_s=val_seconds,
            )
            if fitted < end_epoch:
                end_epoch, shrunk = fitted, True
                scheduler.milestones = collections.Counter(
                    _shrunk_milestones(
                        sorted(scheduler.milestones.elements()),
                        _milestones(config, epochs=end_epoch),
                        scheduler.last_epoch,
                        end_epoch,
                    )
                )
                tqdm.write(
                    f"radnet-train: time limit: ending after epoch {end_epoch} of "
                    f"{config.train.epochs}, step schedule {sorted(scheduler.milestones)}",
                    file=sys.stderr,
                )
        # validation costs a full inference pass over the 30 % split; val_every > 1 spares it
        validated = (
            (epoch + 1) % config.train.val_every == 0
            or epoch + 1 == config.train.epochs
            or (shrunk and epoch + 1 == end_epoch)
            # under a time limit the first epoch is validated too: what a validation costs is
            # part of every estimate after it
            or (deadline is not None and epoch == start_epoch)
        )
        validation = validate(model, val_cases, runtime, config) if validated else None
        if validation is not None:
            val_seconds = time.monotonic() - epoch_started - train_seconds
            val_total += val_seconds
        improved = False
        if validation is not None and selection_key(validation) > best_key:
            improved = True
            best_key, best_epoch = selection_key(validation), epoch + 1
            best_validation = validation
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": sums["loss"] / steps,
            "train_main_loss": sums["main"] / steps,
            "train_aux_loss": sums["aux"] / steps,
            "sequences": epoch_size,
            "positive_slice_fraction": positive_slices / known_slices if known_slices else None,
            "train_seconds": round(train_seconds, 2),
            "val_seconds": round(time.monotonic() - epoch_started - train_seconds, 2),
            "val": None
            if validation is None
            else {k: v for k, v in validation.items() if k != "cases"},
            "best": improved,
        }
        with (run_dir / "history.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch + 1,
            "model_config": model_cfg.to_dict(),
            "preprocess": preprocess_spec_for(config).to_dict(),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": scaler.state_dict(),
            "init_sha256": init_sha,
            "rng": _rng_states(),
            "config": config.to_dict(),
            "split": split,
            "best_key": best_key,
            "best_epoch": best_epoch,
            "best_validation": best_validation,
            "validation": validation,
            "threshold": config.train.threshold,
            "min_consecutive": config.train.min_consecutive,
            "min_extent_mm": config.train.min_extent_mm,
            # from the shrink on, the saved schedule no longer spans train.epochs: no resume
            "ended_by_time_limit": shrunk,
        }
        atomic_torch_save(checkpoint, last_path)
        if improved:
            shutil.copyfile(last_path, best_path.with_suffix(".pt.tmp"))
            os.replace(best_path.with_suffix(".pt.tmp"), best_path)
        tqdm.write(
            f"epoch {epoch + 1}/{config.train.epochs} loss {record['train_loss']:.4f} "
            f"({train_seconds:.0f} s) | "
            f"{'not validated' if validation is None else _format_metrics(validation)}"
            f"{' | best' if improved else ''}",
            file=sys.stderr,
        )

    summary = {
        "variant": model_cfg.variant,
        "epochs": config.train.epochs,
        "epochs_done": end_epoch,
        "finished": end_epoch >= config.train.epochs,
        "ended_by_time_limit": shrunk,
        "best_epoch": best_epoch,
        "best_validation": {k: v for k, v in best_validation.items() if k != "cases"},
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "train_slices": n_train_slices,
        "skipped_cases": len(skipped),
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "runtime": runtime.describe(),
        "seconds_this_session": round(time.monotonic() - started, 1),
        "config": config.to_dict(),
    }
    _write_json_atomic(run_dir / "summary.json", summary)
    if skipped:
        tqdm.write(
            f"radnet-train: {len(skipped)} case(s) skipped, listed in {run_dir / 'summary.json'}",
            file=sys.stderr,
        )
    return TrainResult(run_dir, best_path, last_path, best_epoch, best_validation, summary)


def _resume_config(saved: TrainConfig, given: TrainConfig) -> TrainConfig:
    """The saved config, except where the data now lives and which device/threads to run on.

    Taken from ``given`` when set there: ``data.specs`` (non-empty), ``data.cache_dir``,
    ``train.device`` (other than "auto"), ``train.threads`` and ``train.load_workers`` (other
    than 1).
    """
    data = saved.data.model_copy(
        update={
            "specs": given.data.specs or saved.data.specs,
            "cache_dir": given.data.cache_dir or saved.data.cache_dir,
        }
    )
    run = saved.train.model_copy(
        update={
            "device": saved.train.device if given.train.device == "auto" else given.train.device,
            "threads": given.train.threads or saved.train.threads,
            "load_workers": given.train.load_workers
            if given.train.load_workers != 1
            else saved.train.load_workers,
        }
    )
    return saved.model_copy(update={"data": data, "train": run})


def _truncate_history(path: Path, epochs_done: int) -> None:
    """Drop history lines of epochs after the checkpoint (written before a crash), keep the rest."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["epoch"] <= epochs_done
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# ----------------------------------------------------------------------------- CLI


def _cli(  # noqa: PLR0917 (typer maps parameters to options)
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Dataset spec, repeatable: layout:DIR, rsna:DIR, physionet:DIR, cq500:DIR",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory")] = Path("runs/radnet"),
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML training config")
    ] = None,
    variant: Annotated[str | None, typer.Option(help="densenet | densenet_a | radnet")] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue RUN_DIR exactly")] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    max_cases: Annotated[int | None, typer.Option(help="Use at most N cases (stratified)")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Preprocessed-case cache")] = None,
    epoch_size: Annotated[int | None, typer.Option(help="Sequences per epoch")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores)")] = None,
    load_workers: Annotated[
        int | None, typer.Option(help="Processes that decode and preprocess the cases")
    ] = None,
    stop_after_epoch: Annotated[
        int | None, typer.Option(help="End this session after epoch N; continue with --resume")
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="Seconds this run may take, loading included; it ends earlier with the step "
            "schedule shrunk to the epochs that fit",
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Start from these weights (checkpoint or exported) to fine-tune"),
    ] = None,
    keep_split: Annotated[
        Path | None,
        typer.Option(help="split.json of an earlier run: keep its sides, split only new cases"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
) -> None:
    """Train RADnet (or an ablation variant) with the paper's recipe."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("model", "variant", variant)
    put("train", "epochs", epochs)
    put("train", "device", device)
    put("train", "seed", seed)
    put("train", "epoch_size", epoch_size)
    put("train", "precision", precision)
    put("train", "threads", threads)
    put("train", "load_workers", load_workers)
    put("train", "init_from", None if init_from is None else str(init_from))
    put("data", "max_cases", max_cases)
    put("data", "cache_dir", None if cache_dir is None else str(cache_dir))
    put("data", "keep_split", None if keep_split is None else str(keep_split))
    try:
        if resume:
            blocked = [
                name
                for name, value in (
                    ("--config", config_file),
                    ("--variant", variant),
                    ("--epochs", epochs),
                    ("--max-cases", max_cases),
                    ("--seed", seed),
                    ("--epoch-size", epoch_size),
                    ("--precision", precision),
                    ("--init-from", init_from),
                    ("--keep-split", keep_split),
                )
                if value is not None
            ]
            if blocked:
                raise ConfigError(
                    f"--resume continues the saved run with its saved config; drop "
                    f"{', '.join(blocked)}"
                )
            config = load_config(
                None,
                {**overrides, "data": {**overrides.get("data", {}), "specs": list(data or [])}},
            )
        else:
            config = load_config(config_file, overrides)
            if data:
                config = validate_config(
                    {
                        **config.to_dict(),
                        "data": {**config.to_dict()["data"], "specs": [*config.data.specs, *data]},
                    },
                    "command line",
                )
        result = train(
            config,
            out,
            resume=resume,
            progress=not quiet,
            stop_after_epoch=stop_after_epoch,
            time_limit_s=time_limit,
        )
    except (RadnetError, ValueError) as error:
        typer.echo(f"radnet-train: error: {error}", err=True)
        raise typer.Exit(code=2) from None
    if result.best_validation:
        typer.echo(f"best epoch {result.best_epoch}: {_format_metrics(result.best_validation)}")
    else:
        typer.echo("no validation yet (val_every); continue with --resume")
    typer.echo(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)")


def main() -> None:
    """Entry point of ``radnet-train``."""
    typer.run(_cli)


if __name__ == "__main__":
    main()
