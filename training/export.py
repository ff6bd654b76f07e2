"""``radnet-export``: turn a finished training run into a shipped weights file and its model card.

The card records what the weights are (variant, model and preprocessing configuration, threshold),
what they were trained on (read from the run and the datasets' manifests), how long it took, and the
held-out metrics of ``radnet-eval`` runs, so that nothing in it is typed by hand.
"""

from __future__ import annotations

import collections
import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from radnet_node.errors import RadnetError, WeightsError
from radnet_node.model import RadnetConfig, build_model
from radnet_node.postprocess import extent_setting
from radnet_node.preprocess import PreprocessSpec
from radnet_node.weights import export_weights, load_model, read_model_card
from training.train import load_checkpoint

LIMITATIONS = [
    "Trained only on synthetic head CT phantoms (MNI152-based anatomy) and on synthetic "
    "hemorrhages inserted into two real single head CT slices; it has never seen a labelled "
    "patient scan.",
    "Metrics are measured on held-out synthetic cases from the same generator; they say nothing "
    "about performance on real patients.",
    "Knows only acute intracranial hemorrhage (50-90 HU); other pathology (tumour, infarct, "
    "fractures, postoperative change, contrast) is out of scope and may trigger false results.",
    "Not a medical device: research and integration testing only.",
]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _dataset_description(spec: str) -> dict[str, Any]:
    """Counts and generator settings of one ``layout:DIR`` training dataset."""
    kind, _, root = spec.partition(":")
    folder = Path(root or kind)
    info: dict[str, Any] = {"spec": spec}
    labels = folder / "labels.csv"
    if labels.is_file():
        with labels.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        info["cases"] = len(rows)
        info["positive_cases"] = sum(int(r["ct_label"]) for r in rows)
        subtypes: dict[str, int] = {}
        for row in rows:
            for subtype in filter(None, (row.get("subtypes") or "").split(";")):
                subtypes[subtype] = subtypes.get(subtype, 0) + 1
        info["cases_per_subtype"] = subtypes
        info["generators"] = sorted({r.get("generator", "") for r in rows} - {""})
    manifest = folder / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        info["generator"] = {
            k: data[k] for k in ("generator_version", "seed", "arguments", "options") if k in data
        }
    return info


def _history_seconds(run_dir: Path) -> float:
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return 0.0
    total = 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        total += float(record.get("train_seconds", 0.0)) + float(record.get("val_seconds", 0.0))
    return total


def _recipe(
    config: Mapping[str, Any], drops: list[int] | None = None, *, time_limited: bool = False
) -> str:
    """One line describing a run's recipe, from its saved config (never typed by hand).

    ``drops``: the epochs after which the run's scheduler lowers the rate; ``time_limited``: a
    time limit (``radnet-train --time-limit``) ended the run and shrank its schedule to them.
    """
    optim, train = config["optim"], config["train"]
    schedule = (
        f"lr x{optim['gamma']:g} at {', '.join(f'{m:.3g}' for m in optim['milestones'])} of "
        f"{train['epochs']} epochs"
    )
    if time_limited and drops is not None:
        schedule += "; a time limit ended the run early, " + (
            f"with lr x{optim['gamma']:g} after epoch {', '.join(str(d) for d in drops)}"
            if drops
            else "before its first drop"
        )
    parts = [
        f"{optim['optimizer']} lr {optim['lr']:g}"
        + (f" momentum {optim['momentum']:g}" if optim["optimizer"] == "sgd" else ""),
        schedule,
    ]
    if train.get("crop_size"):
        parts.append(
            f"first {train['crop_fraction']:.0%} of the epochs on {train['crop_size']} px crops"
        )
    if train.get("trainable", "all") != "all":
        parts.append(f"trainable: {train['trainable']}")
    parts.append("from " + (train["init_from"] if train.get("init_from") else "He initialisation"))
    return ", ".join(parts)


def _scheduler_drops(state: Mapping[str, Any]) -> list[int] | None:
    """The epochs after which a checkpoint's scheduler lowers the learning rate (None: unknown)."""
    milestones = state.get("scheduler_state", {}).get("milestones")
    if milestones is None:
        return None
    # a Counter: a milestone counted twice is two drops at once
    return sorted(int(m) for m in collections.Counter(milestones).elements())


def _card_of_weights(path: Path) -> dict[str, Any] | None:
    """The model card beside exported weights, when ``path`` is such a file with a valid card."""
    if not path.is_file():
        return None
    try:
        return read_model_card(path).to_dict()
    except WeightsError:
        return None


def _describes_initial_weights(
    card: Mapping[str, Any], expected_sha256: str | None, chain: set[Path]
) -> bool:
    """Whether ``card`` still describes the weights a run started from, so its stages come first.

    A run records the sha256 of its initial weights; when the file at that path has been replaced
    since (shipped weights are overwritten by the next export), its card describes other weights.
    Runs from before that record was kept are taken at their word, unless the card lists a run of
    this very chain (then it describes weights made after the run started).
    """
    stages = card.get("training", {}).get("stages")
    if not isinstance(stages, list):
        return False
    if expected_sha256 is not None and card.get("sha256") != expected_sha256:
        return False
    return not any(Path(str(s.get("run", ""))).resolve() in chain for s in stages)


def training_stages(run_dir: Path, checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run and, through ``train.init_from``, the runs it continued, oldest first.

    When a run started from exported weights (a ``.pt`` with its model card beside it), the stages
    that the card lists come first, each marked with the card's ``from_card`` (name, version,
    sha256): fine-tuning shipped weights keeps their whole history. A stage whose ``init_from`` is
    neither a ``RUN/checkpoints/*.pt`` that still exists nor carded weights that are still the ones
    the run started from (it keeps their sha256) is recorded by path only
    (``previous_stage_missing``).
    """
    return _stage_chain(run_dir, checkpoint)[0]


def _stage_chain(
    run_dir: Path, checkpoint: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """:func:`training_stages`, and the card of the exported weights the chain started from."""
    stages: list[dict[str, Any]] = []
    initial_card: dict[str, Any] | None = None
    seen: set[Path] = set()
    current: tuple[Path, Mapping[str, Any]] | None = (run_dir, checkpoint)
    while current is not None:
        folder, state = current
        config, train = state["config"], state["config"]["train"]
        stage = {
            "run": str(folder),
            "recipe": _recipe(
                config,
                _scheduler_drops(state),
                time_limited=bool(state.get("ended_by_time_limit")),
            ),
            "epochs": int(state["epoch"]),
            "epoch_size_sequences": train.get("epoch_size"),
            "sequence_length": train["sequence_length"],
            "slices_seen": (train.get("epoch_size") or 0)
            * train["sequence_length"]
            * int(state["epoch"]),
            "wall_time_seconds": round(_history_seconds(folder), 1),
            "init_from": train.get("init_from"),
        }
        if state.get("init_sha256"):
            stage["init_sha256"] = state["init_sha256"]
        stages.append(stage)
        seen.add(folder.resolve())
        current = None
        init = Path(train["init_from"]) if train.get("init_from") else None
        if init is not None:
            parent = init.parent.parent
            known = parent.resolve() in seen
            card = _card_of_weights(init)
            if init.parent.name == "checkpoints" and init.is_file() and not known:
                current = (parent, load_checkpoint(init))
            elif card is not None and _describes_initial_weights(
                card, state.get("init_sha256"), seen
            ):
                initial_card = card
                origin = {k: card.get(k) for k in ("name", "version", "sha256")}
                # a stage that an earlier card already carried keeps the card it came from
                stages.extend(
                    {**earlier, "from_card": earlier.get("from_card", origin)}
                    for earlier in reversed(card["training"]["stages"])
                )
            else:
                stage["previous_stage_missing"] = True
                if card is not None:
                    stage["initial_weights_replaced"] = (
                        f"{init} no longer holds the weights this run started from"
                    )
    return stages[::-1], initial_card


def build_card_fields(
    run_dir: Path, checkpoint: Mapping[str, Any], evaluations: Mapping[str, Path]
) -> dict[str, Any]:
    """The training-data, training and metrics sections of the model card."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    config = checkpoint["config"]
    specs = list(config["data"]["specs"])
    training_data = {
        "description": (
            "Synthetic head CT series from radnet-phantoms: MNI152 (ICBM 2009a) grey/white matter "
            "and CSF with a synthetic skull, scalp and scanner model, with synthetic acute "
            "hemorrhages of five subtypes (intraparenchymal, subdural, epidural, subarachnoid, "
            "intraventricular) and hyperdense mimics in normal cases; plus hemorrhages inserted "
            "into two real single head CT slices (pydicom/pylibjpeg test data). No patient labels."
        ),
        "datasets": [_dataset_description(s) for s in specs],
        "split": "70:30 at CT level, stratified by CT label (training:validation)",
        "train_cases": summary.get("train_cases"),
        "validation_cases": summary.get("val_cases"),
        "train_slices": summary.get("train_slices"),
        "skipped_cases": summary.get("skipped_cases"),
    }
    stages, initial_card = _stage_chain(run_dir, checkpoint)
    if initial_card is not None and "training_data" in initial_card:
        # what the initial weights had learnt from is part of what these weights learnt from
        training_data["initial_weights"] = {
            **{k: initial_card.get(k) for k in ("name", "version", "sha256")},
            "training_data": initial_card["training_data"],
        }
    training = {
        "recipe": "; ".join(stage["recipe"] for stage in stages),
        "stages": stages,
        "epochs": sum(stage["epochs"] for stage in stages),
        "slices_seen": sum(stage["slices_seen"] for stage in stages),
        "best_epoch": checkpoint.get("best_epoch"),
        "wall_time_seconds": round(sum(stage["wall_time_seconds"] for stage in stages), 1),
        "runtime": summary.get("runtime"),
        "config": config,
    }
    metrics: dict[str, Any] = {"validation_best_epoch": checkpoint.get("best_validation")}
    for name, path in evaluations.items():
        metrics[name] = json.loads(path.read_text(encoding="utf-8"))
    return {"training_data": training_data, "training": training, "metrics": metrics}


def average_states(
    own: Mapping[str, torch.Tensor], others: list[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The uniform average of ``own`` and ``others`` (a "model soup" of weights fine-tuned from
    one start): floating tensors are averaged in float32 and keep ``own``'s dtype; integer buffers
    (batch-norm step counters) are ``own``'s.

    Raises
    ------
    RadnetError
        When a state has other keys or shapes than ``own``.
    """
    averaged: dict[str, torch.Tensor] = {}
    for index, other in enumerate(others, start=1):
        if set(other) != set(own):
            raise RadnetError(
                f"weights {index} to average with have other tensors than the run's "
                f"({len(set(other) ^ set(own))} names differ)"
            )
    for key, value in own.items():
        if not value.is_floating_point():
            averaged[key] = value
            continue
        total = value.float()
        for other in others:
            if other[key].shape != value.shape:
                raise RadnetError(
                    f"{key}: shape {tuple(other[key].shape)} in weights to average with, "
                    f"{tuple(value.shape)} in the run"
                )
            total = total + other[key].float()
        averaged[key] = (total / (1 + len(others))).to(value.dtype)
    return averaged


def _averaging(
    paths: list[Path], checkpoint: Mapping[str, Any]
) -> tuple[list[Mapping[str, torch.Tensor]], list[dict[str, Any]]]:
    """States of exported weights to average with (each checked against its card, and against
    the run's architecture and preprocessing) and what the card records of them."""
    states: list[Mapping[str, torch.Tensor]] = []
    records: list[dict[str, Any]] = []
    for path in paths:
        model, card = load_model(path)
        comparisons: tuple[tuple[str, Mapping[str, Any], Mapping[str, Any]], ...] = (
            ("model", card.radnet_config.to_dict(), checkpoint["model_config"]),
            ("preprocessing", dict(card.preprocess), dict(checkpoint["preprocess"])),
        )
        for what, theirs, ours in comparisons:
            if theirs != ours:
                raise RadnetError(
                    f"{path}: its {what} differs from the run's; only weights of one "
                    "architecture and one preprocessing can be averaged"
                )
        states.append(model.state_dict())
        records.append(
            {"path": str(path), "name": card.name, "version": card.version, "sha256": card.sha256}
        )
    return states, records


@app.command()
def export(  # noqa: PLR0917 (typer maps parameters to options)
    run: Annotated[Path, typer.Option(help="radnet-train run directory")],
    out: Annotated[Path, typer.Option(help="Weights file to write (.pt); the card goes beside it")],
    version: Annotated[str, typer.Option(help="Model version written into the card")],
    metrics: Annotated[
        list[str] | None,
        typer.Option(help="NAME=PATH of a radnet-eval metrics.json, repeatable"),
    ] = None,
    checkpoint_name: Annotated[str, typer.Option("--checkpoint", help="best | last")] = "best",
    name: Annotated[str, typer.Option(help="Model name")] = "radnet-ich",
    threshold: Annotated[float | None, typer.Option(help="Decision threshold")] = None,
    min_extent_mm: Annotated[
        float | None,
        typer.Option(
            help="Length of blood in mm a positive CT's run of slices must span (the card's "
            "min_positive_extent_mm; default: the run's [train] min_extent_mm; 0: none)"
        ),
    ] = None,
    average_with: Annotated[
        list[Path] | None,
        typer.Option(
            help="Exported weights (with their card) to average the run's weights with, "
            "uniformly; repeatable. For weights fine-tuned from these or from a common start"
        ),
    ] = None,
) -> None:
    """Export RUN/checkpoints/{best,last}.pt as OUT with its model card OUT.json."""
    try:
        checkpoint = load_checkpoint(run / "checkpoints" / f"{checkpoint_name}.pt")
        evaluations: dict[str, Path] = {}
        for item in metrics or []:
            label, sep, path = item.partition("=")
            if not sep or not Path(path).is_file():
                raise RadnetError(f"--metrics {item!r}: expected NAME=PATH of an existing file")
            evaluations[label] = Path(path)
        config = RadnetConfig.from_dict(checkpoint["model_config"])
        model = build_model(
            config.variant, **{k: v for k, v in config.to_dict().items() if k != "variant"}
        )
        state = checkpoint["model_state"]
        averaged_with: list[dict[str, Any]] = []
        if average_with:
            others, averaged_with = _averaging(list(average_with), checkpoint)
            state = average_states(state, others)
        model.load_state_dict(state, strict=True)
        fields = build_card_fields(run, checkpoint, evaluations)
        if averaged_with:
            training = fields["training"]
            training["averaged_with"] = averaged_with
            training["stages"][-1]["averaged_with"] = averaged_with
            # the run's own validation describes its weights before the average
            fields["metrics"]["validation_best_epoch_before_averaging"] = fields["metrics"].pop(
                "validation_best_epoch"
            )
            training["recipe"] += "; exported as the uniform average of its weights and " + (
                ", ".join(f"{a['name']} {a['version']} (sha256 {a['sha256'][:12]})"
                          for a in averaged_with)
            )  # fmt: skip
        card = export_weights(
            model,
            out,
            name=name,
            version=version,
            preprocess=PreprocessSpec.from_dict(checkpoint["preprocess"]),
            threshold=float(threshold if threshold is not None else checkpoint["threshold"]),
            min_consecutive_slices=int(checkpoint["min_consecutive"]),
            limitations=LIMITATIONS,
            min_positive_extent_mm=extent_setting(checkpoint.get("min_extent_mm"), min_extent_mm),
            **fields,
        )
    except (RadnetError, OSError, KeyError, ValueError) as error:
        typer.echo(f"radnet-export: error: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {out} (sha256 {card.sha256[:16]}...) and {out.with_suffix('.json')}")


def main() -> None:
    app()
