"""``radnet-eval``: the paper's CT-level evaluation (Tables 1 and 2) of a checkpoint or weights.

``radnet-eval --checkpoint FILE --data SPEC`` scores one model; ``radnet-eval ablation`` trains the
three variants (DenseNet, DenseNet-A, RADnet) with one split, seed and recipe and prints Table 1.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve
from tqdm import tqdm

from radnet_node.errors import ConfigError, DatasetError, RadnetError
from radnet_node.model import VARIANTS, RADnet, RadnetConfig
from radnet_node.postprocess import ct_score, extent_setting, rule_text
from radnet_node.preprocess import PreprocessSpec
from radnet_node.weights import card_path_for, load_model
from training.config import TrainConfig, load_config
from training.datasets import CaseDataset, ConcatDataset, open_dataset
from training.inference import (
    CaseResult,
    Runtime,
    binary_metrics,
    known_slice_arrays,
    predict_series,
    resolve_runtime,
    score_case,
    summarize,
)
from training.train import load_checkpoint, read_split, train

log = logging.getLogger("radnet.eval")

VARIANT_TITLES = {"densenet": "DenseNet", "densenet_a": "DenseNet-A", "radnet": "RADnet"}
TABLE_ROWS = (
    ("Accuracy", "accuracy"),
    ("Recall", "recall"),
    ("Precision", "precision"),
    ("F1 score", "f1"),
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to evaluate, with what it was trained with."""

    model: RADnet
    preprocess: PreprocessSpec
    threshold: float
    min_consecutive: int
    min_extent_mm: float | None  # the card's millimetre rule (None: the slice count alone)
    split: Mapping[str, list[str]] | None  # train/val case ids (training checkpoints only)
    data_specs: tuple[str, ...]
    source: str


def load_for_evaluation(path: Path) -> LoadedModel:
    """Load a radnet-train checkpoint, or a weights file with its model card beside it.

    Raises
    ------
    RadnetError
        WeightsError for a weights file that fails its card's checks; RadnetError for a missing or
        unreadable checkpoint.
    """
    path = Path(path)
    if card_path_for(path).is_file():
        model, card = load_model(path)
        return LoadedModel(
            model,
            card.preprocess_spec,
            card.threshold,
            card.min_consecutive_slices,
            card.min_positive_extent_mm,
            None,
            (),
            f"weights {path}",
        )
    state = load_checkpoint(path)
    model = RADnet(RadnetConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model_state"], strict=True)
    model.eval()
    return LoadedModel(
        model,
        PreprocessSpec.from_dict(state["preprocess"]),
        float(state["threshold"]),
        int(state["min_consecutive"]),
        state.get("min_extent_mm"),  # checkpoints before the millimetre rule have none
        state["split"],
        tuple(state["config"]["data"]["specs"]),
        f"checkpoint {path} (epoch {state['epoch']})",
    )


@dataclass(frozen=True)
class Evaluation:
    """Per-case results, the metrics summary and the cases that could not be loaded."""

    results: tuple[CaseResult, ...]
    summary: dict[str, Any]
    skipped: tuple[tuple[str, str], ...]


def evaluate_cases(
    model: RADnet,
    dataset: CaseDataset,
    case_ids: Sequence[str],
    runtime: Runtime,
    *,
    threshold: float = 0.5,
    min_consecutive: int = 3,
    min_extent_mm: float | None = None,
    chunk: int = 4,
    progress: bool = True,
) -> Evaluation:
    """Predict every case (whole series) and compute the metrics.

    A case whose loading fails with DatasetError is skipped with a warning and listed.

    Raises
    ------
    DatasetError
        If no case could be evaluated.
    """
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.eval()
    results: list[CaseResult] = []
    skipped: list[tuple[str, str]] = []
    for case_id in tqdm(
        case_ids, desc="evaluating", unit="case", disable=not progress, file=sys.stderr
    ):
        try:
            case = dataset.load(case_id)
        except DatasetError as error:
            tqdm.write(f"warning: skipping case {case_id}: {error}", file=sys.stderr)
            skipped.append((case_id, str(error)))
            continue
        prediction = predict_series(model, case.image, runtime, chunk=chunk)
        labels = case.slice_labels.copy()
        if case.ct_label == 0:
            labels[labels < 0] = 0  # no slice of a negative CT holds blood (as in training)
        results.append(
            score_case(
                case.case_id,
                case.ct_label,
                slice_labels=labels,
                mask=case.mask,
                prediction=prediction,
                reader_labels=case.reader_labels,
                slice_spacing_mm=case.slice_spacing_mm,
            )
        )
    if not results:
        raise DatasetError(f"{dataset.name}: no case could be evaluated ({len(skipped)} skipped)")
    summary = summarize(
        results, threshold=threshold, min_consecutive=min_consecutive, min_extent_mm=min_extent_mm
    )
    summary["skipped_cases"] = len(skipped)
    summary["skipped"] = [{"case_id": c, "reason": r} for c, r in skipped]
    return Evaluation(tuple(results), summary, tuple(skipped))


def plot_roc_and_thresholds(
    results: Sequence[CaseResult],
    threshold: float,
    min_consecutive: int,
    path: Path,
    min_extent_mm: float | None = None,
) -> None:
    """PNG: slice-level ROC with the operating point, and CT-level recall/precision/F1 vs threshold.

    The CT-level curves use ``ct_score >= t``, which equals the consecutive-slice decision at slice
    threshold ``t`` (see radnet_node.postprocess).
    """
    # the object-oriented API needs no pyplot backend and no display (Agg renders the PNG)
    figure = Figure(figsize=(11, 4.5))
    left, right = figure.subplots(1, 2)
    labels, probs = known_slice_arrays(results)
    if np.unique(labels).size == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        left.plot(fpr, tpr, label="slice ROC")
        predicted = probs >= threshold
        op_tpr = predicted[labels == 1].mean()
        op_fpr = predicted[labels == 0].mean()
        left.plot(
            [op_fpr], [op_tpr], "o", color="C3", label=f"operating point (p >= {threshold:g})"
        )
    else:
        left.text(0.5, 0.5, "slice ROC undefined:\nonly one class labelled", ha="center")
    ct_labels = np.array([r.ct_label for r in results])
    scores = np.array(
        [
            ct_score(r.slice_probabilities, r.slices_needed(min_consecutive, min_extent_mm))
            for r in results
        ]
    )
    if np.unique(ct_labels).size == 2:
        fpr, tpr, _ = roc_curve(ct_labels, scores)
        left.plot(fpr, tpr, "--", label=f"CT ROC ({rule_text(min_consecutive, min_extent_mm)})")
    left.plot([0, 1], [0, 1], ":", color="grey")
    left.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    left.legend(loc="lower right", fontsize=8)

    thresholds = np.linspace(0.01, 0.99, 99)
    curves = np.array(
        [
            [
                getattr(binary_metrics(ct_labels, (scores >= t).astype(int)), name)
                for name in ("recall", "precision", "f1")
            ]
            for t in thresholds
        ]
    )
    for column, name in enumerate(("recall", "precision", "F1")):
        right.plot(thresholds, curves[:, column], label=f"CT {name}")
    right.axvline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    right.set(
        xlabel="slice probability threshold",
        ylabel="CT-level metric",
        title=f"CT level vs threshold (n = {len(results)} CTs)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    right.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _open(specs: Sequence[str], spec: PreprocessSpec, cache_dir: Path | None) -> CaseDataset:
    if not specs:
        raise ConfigError("no data: give --data SPEC (e.g. layout:/path)")
    datasets = [open_dataset(s, spec, cache_dir) for s in specs]
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def _read_split_file(path: Path) -> tuple[list[str], list[str] | None]:
    """The validation case ids of a run's ``split.json`` and, when ``config.json`` sits beside
    it, that run's data specs (case ids depend on the specs and their order)."""
    ids = read_split(path, "--split-file", ("val",))["val"]
    if not ids:
        raise ConfigError(f"{path}: --split-file: the 'val' list is empty")
    specs = None
    config = path.parent / "config.json"
    if config.is_file():
        try:
            specs = json.loads(config.read_text(encoding="utf-8"))["data"]["specs"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{config}: cannot read the run's data specs: {error}") from None
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise ConfigError(f"{config}: data.specs is not a list of dataset specs")
    return ids, (specs or None)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def format_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table laid out like the paper's tables: metric rows, one column per model/reader."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for title, key in TABLE_ROWS:
        lines.append(f"| {title} | " + " | ".join(_pct(columns[n][key]) for n in names) + " |")
    return "\n".join(lines)


def reader_table(
    results: Sequence[CaseResult],
    threshold: float,
    min_consecutive: int,
    min_extent_mm: float | None = None,
) -> tuple[dict[str, dict[str, Any]], int] | None:
    """Table 2: each reader's reads and the model's decisions scored against the reference label.

    Uses the CTs that carry reads from every reader; ``None`` when no CT has reads.
    """
    readers = sorted({name for r in results for name in r.reader_labels})
    if not readers:
        return None
    cases = [r for r in results if all(name in r.reader_labels for name in readers)]
    if not cases:
        return None
    truth = [r.ct_label for r in cases]
    columns: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(readers, start=1):
        columns[f"Rad. {index}"] = binary_metrics(
            truth, [r.reader_labels[name] for r in cases]
        ).to_dict() | {"reader": name}
    model_pred = [
        int(
            ct_score(r.slice_probabilities, r.slices_needed(min_consecutive, min_extent_mm))
            >= threshold
        )
        for r in cases
    ]
    columns["RADnet"] = binary_metrics(truth, model_pred).to_dict()
    return columns, len(cases)


def write_evaluation(
    evaluation: Evaluation,
    out_dir: Path,
    *,
    threshold: float,
    min_consecutive: int,
    min_extent_mm: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write metrics.json and roc.png into ``out_dir``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(extra or {}) | evaluation.summary
    table2 = reader_table(evaluation.results, threshold, min_consecutive, min_extent_mm)
    if table2 is not None:
        data["readers"] = {"n": table2[1], "columns": table2[0]}
    json_path = out_dir / "metrics.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plot_roc_and_thresholds(
        evaluation.results, threshold, min_consecutive, out_dir / "roc.png", min_extent_mm
    )
    return json_path


def _summary_line(summary: Mapping[str, Any]) -> str:
    ct = summary["ct"]
    auc = summary["slice"]["auc"]
    ct_auc = summary["ct_auc"]
    dice = summary["dice"]["mean"]
    return (
        f"CT level (n={ct['n']}): accuracy {_pct(ct['accuracy'])}, recall {_pct(ct['recall'])}, "
        f"precision {_pct(ct['precision'])}, F1 {_pct(ct['f1'])} "
        f"(TP {ct['tp']} FP {ct['fp']} TN {ct['tn']} FN {ct['fn']}); "
        f"slice AUC {'n/a' if auc is None else f'{auc:.4f}'}, "
        f"CT AUC {'n/a' if ct_auc is None else f'{ct_auc:.4f}'}, "
        f"Dice {'n/a' if dice is None else f'{dice:.4f}'} "
        f"({summary['dice']['n']} CTs with blood)" + _short_blood_note(summary)
    )


def _short_blood_note(summary: Mapping[str, Any]) -> str:
    short = summary.get("short_blood") or {}
    if not short.get("n"):
        return ""
    extent = summary.get("min_positive_extent_mm")
    needed = f"{summary['min_consecutive']}" + (
        "" if extent is None else f" (or {extent:g} mm, on thin slices)"
    )
    return (
        f"; {short['n']} positive CT(s) have blood on fewer than {needed} "
        f"consecutive slices, {short['missed']} of them missed"
    )


@dataclass(frozen=True)
class AblationResult:
    table1: str
    table2: str | None
    metrics: dict[str, dict[str, Any]]
    json_path: Path


def run_ablation(
    config: TrainConfig,
    out_dir: Path,
    *,
    test_specs: Sequence[str] = (),
    progress: bool = True,
) -> AblationResult:
    """Train the three variants with one split, seed and recipe, evaluate each, build Table 1.

    Each variant trains in ``out_dir/<variant>``; a finished variant is reused, an unfinished one is
    resumed. The best checkpoint of each is evaluated on the held-out 30 % split, or on
    ``test_specs`` when given (a separate test set, as in the paper: the held-out split also chose
    the best epoch, so its numbers are optimistic).

    Raises
    ------
    RadnetError
        From training or evaluation (bad config, no usable data, ...).
    """
    out_dir = Path(out_dir)
    spec = PreprocessSpec(**config.preprocess.model_dump())
    cache = Path(config.data.cache_dir) if config.data.cache_dir else None
    dataset = _open(config.data.specs, spec, cache)
    test_dataset = _open(test_specs, spec, cache) if test_specs else None
    metrics: dict[str, dict[str, Any]] = {}
    radnet_eval: Evaluation | None = None
    for variant in VARIANTS:
        variant_config = config.model_copy(
            update={"model": config.model.model_copy(update={"variant": variant})}
        )
        run_dir = out_dir / variant
        last = run_dir / "checkpoints" / "last.pt"
        resume = last.exists()
        if resume and load_checkpoint(last)["epoch"] >= config.train.epochs:
            tqdm.write(
                f"ablation: {variant} already trained in {run_dir}; reusing it", file=sys.stderr
            )
        else:
            tqdm.write(f"ablation: training {variant} in {run_dir}", file=sys.stderr)
            train(variant_config, run_dir, resume=resume, dataset=dataset, progress=progress)
        loaded = load_for_evaluation(run_dir / "checkpoints" / "best.pt")
        runtime = resolve_runtime(
            config.train.device,
            config.train.precision,
            channels_last=config.train.channels_last,
            threads=config.train.threads,
        )
        if test_dataset is not None:
            eval_data, ids, split_name = test_dataset, test_dataset.case_ids(), "test"
        else:
            assert loaded.split is not None  # our own checkpoint always carries its split
            eval_data, ids, split_name = dataset, loaded.split["val"], "val"
        evaluation = evaluate_cases(
            loaded.model,
            eval_data,
            ids,
            runtime,
            threshold=loaded.threshold,
            min_consecutive=loaded.min_consecutive,
            min_extent_mm=loaded.min_extent_mm,
            chunk=config.train.eval_chunk,
            progress=progress,
        )
        write_evaluation(
            evaluation,
            run_dir / "eval",
            threshold=loaded.threshold,
            min_consecutive=loaded.min_consecutive,
            min_extent_mm=loaded.min_extent_mm,
            extra={"source": loaded.source, "split": split_name},
        )
        metrics[variant] = {k: v for k, v in evaluation.summary.items() if k != "cases"}
        if variant == "radnet":
            radnet_eval = evaluation
    table1 = format_table({VARIANT_TITLES[v]: metrics[v]["ct"] for v in VARIANTS})
    table2 = None
    data: dict[str, Any] = {"variants": metrics, "table1_markdown": table1}
    if radnet_eval is not None:
        readers = reader_table(
            radnet_eval.results,
            config.train.threshold,
            config.train.min_consecutive,
            config.train.min_extent_mm,
        )
        if readers is not None:
            table2 = format_table(readers[0])
            data["readers"] = {"n": readers[1], "columns": readers[0], "table2_markdown": table2}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "ablation.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out_dir / "ablation.md").write_text(
        table1 + "\n" + ("" if table2 is None else "\n" + table2 + "\n"), encoding="utf-8"
    )
    return AblationResult(table1, table2, metrics, json_path)


# ----------------------------------------------------------------------------- CLI

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Evaluate RADnet at CT level (paper Table 1/2), or run the ablation.",
)


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"radnet-eval: error: {error}", err=True)
    return typer.Exit(code=2)


@app.callback(invoke_without_command=True)
def evaluate(  # noqa: PLR0917 (typer maps parameters to options)
    ctx: typer.Context,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="RUN_DIR/checkpoints/best.pt, or a weights file with its model card beside it"
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", help="Dataset spec, repeatable (default: the checkpoint's training data)"
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="val (held-out split of the checkpoint) | all")
    ] = "val",
    split_file: Annotated[
        Path | None,
        typer.Option(
            help="RUN_DIR/split.json of another run: evaluate its validation cases (with that "
            "run's data unless --data is given), e.g. to compare weights on one validation set"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and roc.png")] = Path(
        "radnet-eval"
    ),
    threshold: Annotated[
        float | None, typer.Option(help="Slice threshold (default: model's)")
    ] = None,
    min_consecutive: Annotated[
        int | None,
        typer.Option(help="Consecutive positive slices for a positive CT (default: model's, 3)"),
    ] = None,
    min_extent_mm: Annotated[
        float | None,
        typer.Option(
            help="A positive CT's run of slices must also span this many mm: max(min-consecutive, "
            "ceil(X / slice spacing)) slices (default: the model card's; 0 turns it off)"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Preprocessed-case cache")] = None,
    chunk: Annotated[int, typer.Option(help="Slices per forward call")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
) -> None:
    """Evaluate one checkpoint or weights file (when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if checkpoint is None:
            raise ConfigError("give --checkpoint FILE (or the 'ablation' sub-command)")
        if split not in ("val", "all"):
            raise ConfigError(f"--split must be 'val' or 'all', got {split!r}")
        loaded = load_for_evaluation(checkpoint)
        t = loaded.threshold if threshold is None else threshold
        k = loaded.min_consecutive if min_consecutive is None else min_consecutive
        if not 0.0 < t < 1.0 or k < 1:
            raise ConfigError(
                f"--threshold must be in (0, 1) and --min-consecutive >= 1 (got {t}, {k})"
            )
        extent = extent_setting(loaded.min_extent_mm, min_extent_mm)
        if extent is not None and not extent > 0:
            raise ConfigError(f"--min-extent-mm must be positive, or 0 for off (got {extent})")
        if split_file is not None and split != "val":
            raise ConfigError("--split-file names the cases itself: leave out --split")
        other_split = _read_split_file(split_file) if split_file is not None else None
        if (
            other_split is not None
            and split_file is not None
            and data
            and other_split[1]
            and list(data) != other_split[1]
        ):
            typer.echo(
                f"radnet-eval: warning: --data differs from the data of {split_file.parent} "
                "(case ids depend on the specs and their order): " + ", ".join(other_split[1]),
                err=True,
            )
        specs = list(data or (other_split[1] if other_split else None) or loaded.data_specs)
        dataset = _open(specs, loaded.preprocess, cache_dir)
        if other_split is not None and split_file is not None:
            ids = other_split[0]
            missing = sorted(set(ids) - set(dataset.case_ids()))
            if missing:
                raise ConfigError(
                    f"{split_file}: {len(missing)} validation case(s) are not in the data "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); give the "
                    "--data specs of that run, in its order"
                )
            split = f"val of {split_file}"
        elif split == "val":
            if loaded.split is None:
                raise ConfigError(
                    f"{checkpoint}: a weights file has no training split; use --split all"
                )
            ids = loaded.split["val"]
        else:
            ids = dataset.case_ids()
        runtime = resolve_runtime(device, precision)  # type: ignore[arg-type]
        evaluation = evaluate_cases(
            loaded.model,
            dataset,
            ids,
            runtime,
            threshold=t,
            min_consecutive=k,
            min_extent_mm=extent,
            chunk=chunk,
            progress=not quiet,
        )
        json_path = write_evaluation(
            evaluation,
            out,
            threshold=t,
            min_consecutive=k,
            min_extent_mm=extent,
            extra={"source": loaded.source, "split": split, "data": specs},
        )
    except (RadnetError, ValueError) as error:
        raise _fail(error) from None
    typer.echo(_summary_line(evaluation.summary))
    typer.echo(
        format_table(
            {
                "RADnet"
                if loaded.model.config.variant == "radnet"
                else VARIANT_TITLES[loaded.model.config.variant]: evaluation.summary["ct"]
            }
        )
    )
    table2 = reader_table(evaluation.results, t, k, extent)
    if table2 is not None:
        typer.echo(f"\nReaders vs reference ({table2[1]} CTs):\n" + format_table(table2[0]))
    typer.echo(f"wrote {json_path} and {out / 'roc.png'}")


@app.command("ablation")
def ablation(  # noqa: PLR0917 (typer maps parameters to options)
    data: Annotated[list[str], typer.Option("--data", help="Dataset spec, repeatable")],
    out: Annotated[Path, typer.Option(help="Folder for the three runs and the tables")],
    epochs: Annotated[int | None, typer.Option(help="Epochs per variant")] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML training config")
    ] = None,
    test_data: Annotated[
        list[str] | None,
        typer.Option("--test-data", help="Separate test set (default: the held-out 30 % split)"),
    ] = None,
    epoch_size: Annotated[int | None, typer.Option(help="Sequences per epoch")] = None,
    max_cases: Annotated[int | None, typer.Option(help="Use at most N cases")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Preprocessed-case cache")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars")] = False,
) -> None:
    """Train DenseNet, DenseNet-A and RADnet alike and print the paper's Table 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {"data": {"specs": list(data)}}
    if cache_dir is not None:
        overrides["data"]["cache_dir"] = str(cache_dir)
    if max_cases is not None:
        overrides["data"]["max_cases"] = max_cases
    for key, value in (("epochs", epochs), ("epoch_size", epoch_size), ("device", device)):
        if value is not None:
            overrides.setdefault("train", {})[key] = value
    try:
        config = load_config(config_file, overrides)
        result = run_ablation(config, out, test_specs=list(test_data or []), progress=not quiet)
    except (RadnetError, ValueError) as error:
        raise _fail(error) from None
    typer.echo(result.table1)
    if result.table2 is not None:
        typer.echo("\n" + result.table2)
    typer.echo(f"wrote {result.json_path}")


def main() -> None:
    """Entry point of ``radnet-eval``."""
    app()


if __name__ == "__main__":
    main()
