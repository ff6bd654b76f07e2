"""Tests of radnet-train: config, sampling, augmentation, loss, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from tiny_layout import TINY_MODEL, TINY_PREPROCESS, write_tiny_layout
from typer.testing import CliRunner

from radnet_node.errors import ConfigError, RadnetError
from radnet_node.model import RADnet
from radnet_node.preprocess import PreprocessSpec
from radnet_node.weights import export_weights, sha256_of
from training.config import TrainConfig, load_config, validate_config
from training.datasets import Case
from training.train import (
    Batch,
    CaseLoader,
    TrainingCase,
    _cli,
    _milestones,
    _optimizer,
    _shrunk_milestones,
    augment,
    build_windows,
    compute_loss,
    crop_batch,
    epochs_within,
    load_cases,
    load_checkpoint,
    model_config_for,
    open_training_data,
    preprocess_spec_for,
    sample_windows,
    split_cases,
    to_training_case,
    train,
)

torch.set_num_threads(1)


def tiny_config(data: Path, **train_overrides: Any) -> TrainConfig:
    return load_config(
        None,
        {
            "model": TINY_MODEL,
            "preprocess": TINY_PREPROCESS,
            "data": {"specs": [f"layout:{data}"]},
            "train": {
                "epochs": 2,
                "sequence_length": 4,
                "epoch_size": 4,
                "threads": 1,
                "precision": "fp32",
                "image_dtype": "float32",
                "eval_chunk": 8,
            }
            | train_overrides,
        },
    )


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_layout(tmp_path_factory.mktemp("tiny") / "data", 6, bad_cases=("broken",))


# ----------------------------------------------------------------------------- config


def test_default_config_is_the_papers_recipe() -> None:
    config = load_config()
    assert config.train.epochs == 60
    assert config.optim.momentum == 0.9
    assert config.optim.weight_decay == 1e-4
    assert _milestones(config) == [20, 40]  # lr / 10 after 1/3 and 2/3 of 60 epochs
    assert config.data.train_fraction == 0.7
    assert config.augment.rotation_deg == 15.0
    assert config.loss.aux_weights == (0.5, 0.3, 0.2)
    assert config.train.sequence_length == 8
    assert config.train.min_consecutive == 3


def test_unknown_key_and_bad_value_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nepochs = 0\nepoch = 3\n[optimiser]\nlr = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "'train.epochs'" in message
    assert "unknown key 'train.epoch'" in message
    assert "unknown key 'optimiser'" in message


def test_bad_toml_and_bad_milestones_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="optim.*milestones"):
        validate_config({"optim": {"milestones": [0.8, 0.2]}})
    with pytest.raises(ConfigError, match="preprocess.*window_knee_hu and window_ceiling_hu go"):
        validate_config({"preprocess": {"window_knee_hu": 70.0}})
    shoulder = validate_config({"preprocess": {"window_knee_hu": 70.0, "window_ceiling_hu": 130.0}})
    assert preprocess_spec_for(shoulder).window_ceiling_hu == 130.0


def test_user_file_overrides_only_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[optim]\nlr = 0.05\n[model]\nvariant = "densenet"\n', encoding="utf-8")
    config = load_config(path, {"train": {"epochs": 3}})
    assert (config.optim.lr, config.model.variant, config.train.epochs) == (0.05, "densenet", 3)
    assert config.optim.momentum == 0.9
    assert _milestones(config) == [1, 2]


# ----------------------------------------------------------------------------- data rules


def _case(case_id: str, labels: list[int], ct_label: int, with_mask: bool = False) -> Case:
    n = len(labels)
    image = np.zeros((n, 8, 8), np.float32)
    mask = np.zeros((n, 8, 8), np.uint8) if with_mask else None
    return Case(case_id, image, np.array(labels, np.int8), mask, ct_label, "layout")


def test_negative_ct_makes_unknown_slices_negative_with_empty_masks() -> None:
    negative = to_training_case(_case("n", [-1, -1, 0], 0))
    assert negative.slice_labels.tolist() == [0, 0, 0]
    assert negative.mask_known.tolist() == [True, True, True]
    positive = to_training_case(_case("p", [-1, 1, 0], 1))
    assert positive.slice_labels.tolist() == [-1, 1, 0]
    assert positive.mask_known.tolist() == [False, False, True]  # no mask: only label-0 slices
    with_mask = to_training_case(_case("m", [-1, 1, 0], 1, with_mask=True))
    assert with_mask.mask_known.all()


def test_windows_cover_every_start_and_flag_blood() -> None:
    cases = [
        to_training_case(_case("a", [0, 0, 1, 0, 0, 0], 1)),
        to_training_case(_case("short", [0, 0], 0)),
    ]
    windows = build_windows(cases, 3)
    a = [(w.start, w.length, w.positive) for w in windows if w.case_index == 0]
    assert a == [(0, 3, True), (1, 3, True), (2, 3, True), (3, 3, False)]
    short = [(w.start, w.length) for w in windows if w.case_index == 1]
    assert short == [(0, 2)]  # fewer slices than the sequence length: one window of all


def test_sampler_balances_positive_and_negative_sequences() -> None:
    cases = [to_training_case(_case("a", [0] * 20 + [1, 1] + [0] * 20, 1))]
    windows = build_windows(cases, 4)
    positive_share = np.mean([w.positive for w in windows])
    assert positive_share < 0.15  # the data itself is unbalanced
    drawn = sample_windows(windows, 4000, 0.5, np.random.default_rng(0))
    assert np.mean([w.positive for w in drawn]) == pytest.approx(0.5, abs=0.03)
    uniform = sample_windows(windows, 4000, None, np.random.default_rng(0))
    assert np.mean([w.positive for w in uniform]) == pytest.approx(positive_share, abs=0.03)


# ----------------------------------------------------------------------------- augmentation, loss


def test_augment_flip_and_rotation_keep_masks_binary_and_aligned() -> None:
    image = torch.zeros(2, 16, 16)
    image[:, 3:6, 10:13] = 1.0  # off-centre square
    mask = (image > 0).float()
    same_image, same_mask = augment(image, mask, 0.0, False)
    assert torch.equal(same_image, image) and torch.equal(same_mask, mask)
    flipped, flipped_mask = augment(image, mask, 0.0, True)
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))
    rotated, rotated_mask = augment(image, mask, 90.0, False)
    assert set(rotated_mask.unique().tolist()) <= {0.0, 1.0}
    candidates = [torch.rot90(image, k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.allclose(rotated, c, atol=1e-4) for c in candidates)
    assert torch.equal(rotated_mask, (rotated >= 0.5).float())  # mask follows the image


def _batch(labels: list[float], known: list[bool]) -> Batch:
    n = len(labels)
    masks = torch.zeros(1, n, 4, 4)
    masks[0, :, 1:3, 1:3] = 1.0
    return Batch(torch.zeros(1, n, 4, 4), torch.tensor([labels]), masks, torch.tensor([known]))


def test_loss_ignores_unknown_labels_and_unknown_masks() -> None:
    config = validate_config({})
    batch = _batch([1.0, -1.0, 0.0], [True, False, True])
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    aux = tuple(torch.zeros(1, 3, 4, 4) for _ in range(3))
    loss, parts = compute_loss(logits, aux, batch, config)
    expected_main = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    )
    assert parts["main"] == pytest.approx(float(expected_main), rel=1e-6)
    # changing the unknown slice's logit or its aux map does not change the loss
    aux_changed = tuple(a.clone() for a in aux)
    for a in aux_changed:
        a[0, 1] = 5.0
    loss2, _ = compute_loss(torch.tensor([[2.0, 7.0, -1.0]]), aux_changed, batch, config)
    assert float(loss2) == pytest.approx(float(loss))
    # the aux part is the weighted sum of BCE + Dice of the known slices
    target = batch.masks[batch.mask_known]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros_like(target), target)
    dice = 1 - (2 * (0.5 * target).sum() + 1) / (0.5 * target.numel() + target.sum() + 1)
    assert parts["aux"] == pytest.approx(float((0.5 + 0.3 + 0.2) * (bce + dice)), rel=1e-5)


def test_positive_slices_with_little_blood_weigh_more_when_asked() -> None:
    batch = _batch([1.0, 1.0, 0.0, -1.0], [True, True, True, True])
    batch.masks[0, 1] = 1.0  # slice 1: 16 pixels of blood; slice 0: 4 (the helper's 2 x 2)
    logits = torch.tensor([[-0.5, 0.3, 0.8, 9.0]])
    each = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[0, :3], torch.tensor([1.0, 1.0, 0.0]), reduction="none"
    )
    off = compute_loss(logits, None, batch, validate_config({}))[1]["main"]
    assert off == pytest.approx(float(each.mean()), rel=1e-6)
    config = validate_config({"loss": {"small_blood_pixels": 10, "small_blood_weight": 3.0}})
    _, parts = compute_loss(logits, None, batch, config)
    assert parts["main"] == pytest.approx(float((3 * each[0] + each[1] + each[2]) / 3), rel=1e-6)


def test_loss_without_aux_heads_or_known_masks_is_the_main_loss() -> None:
    config = validate_config({})
    batch = _batch([1.0, 0.0], [False, False])
    logits = torch.tensor([[0.5, -0.5]])
    aux = tuple(torch.zeros(1, 2, 4, 4) for _ in range(3))
    loss, parts = compute_loss(logits, aux, batch, config)
    assert parts["aux"] == 0.0 and float(loss) == pytest.approx(parts["main"])
    loss_none, _ = compute_loss(logits, None, batch, config)
    assert float(loss_none) == pytest.approx(float(loss))


# ----------------------------------------------------------------------------- runs


def _history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_training_run_writes_checkpoints_history_summary_and_skips_the_bad_case(
    tiny_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = train(tiny_config(tiny_data), run, progress=False)
    assert (run / "checkpoints" / "last.pt").is_file()
    assert (run / "checkpoints" / "best.pt").is_file()
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.1)  # milestone after epoch 1
    for record in history:
        assert np.isfinite(record["train_loss"])
        assert {"auc", "n"} <= set(record["val"]["slice"])
        assert {"recall", "precision", "f1"} <= set(record["val"]["ct"])
        assert "mean" in record["val"]["dice"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_cases"] == 1
    assert summary["skipped"][0]["case_id"] == "broken"
    assert "not a readable DICOM" in summary["skipped"][0]["reason"]
    assert summary["train_cases"] + summary["val_cases"] == 6
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["model_config"]["input_size"] == 32
    assert result.best_epoch in (1, 2)


def test_resume_continues_exactly_like_an_uninterrupted_run(
    tiny_data: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, epochs=3)
    full = tmp_path / "full"
    train(config, full, progress=False)
    parted = tmp_path / "parted"
    train(config, parted, progress=False, stop_after_epoch=1)
    assert [h["epoch"] for h in _history(parted)] == [1]
    with pytest.raises(ConfigError, match="--resume"):
        train(config, parted, progress=False)
    train(config, parted, resume=True, progress=False)
    full_history, parted_history = _history(full), _history(parted)
    assert [h["epoch"] for h in parted_history] == [1, 2, 3]
    for a, b in zip(full_history, parted_history, strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert a["lr"] == b["lr"]
        assert a["val"] == b["val"]
    full_state = load_checkpoint(full / "checkpoints" / "last.pt")["model_state"]
    parted_state = load_checkpoint(parted / "checkpoints" / "last.pt")["model_state"]
    assert all(torch.equal(full_state[k], parted_state[k]) for k in full_state)


def test_a_time_limit_ends_the_run_early_with_its_last_epoch_validated(
    tiny_data: Path, tmp_path: Path
) -> None:
    # a limit already spent: the one epoch that always runs is also the last, and is validated
    config = tiny_config(tiny_data, epochs=6, val_every=4)
    result = train(config, tmp_path / "run", progress=False, time_limit_s=1e-6)
    history = _history(tmp_path / "run")
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["val"] is not None
    assert result.best_epoch == 1
    assert result.summary["epochs_done"] == 1 and result.summary["finished"] is False
    assert result.summary["ended_by_time_limit"] is True
    # its schedule was shrunk: resuming it to the planned six epochs is refused
    with pytest.raises(ConfigError, match="ended by --time-limit after epoch 1"):
        train(config, tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["ended_by_time_limit"]
    # without a limit the same config runs all six epochs
    full = train(config, tmp_path / "full", progress=False)
    assert [h["epoch"] for h in _history(tmp_path / "full")] == [1, 2, 3, 4, 5, 6]
    assert full.summary["finished"] is True


def test_epochs_within_keeps_time_for_the_last_validation() -> None:
    assert epochs_within(100.0, done=2, seconds_per_epoch=10.0, final_validation_s=15.0) == 10
    assert epochs_within(5.0, done=3, seconds_per_epoch=10.0, final_validation_s=0.0) == 3
    assert epochs_within(-50.0, done=1, seconds_per_epoch=10.0, final_validation_s=0.0) == 1


def test_a_shrunk_schedule_keeps_drops_taken_and_never_moves_one_into_the_past() -> None:
    # 60 planned epochs (drops at 20, 40), refitted to 30 after epoch 25: 20 was taken, 40 -> 20
    # would be in the past, so the second drop comes at the next epoch
    assert _shrunk_milestones([20, 40], [10, 20], passed=25, end=30) == [20, 26]
    # refitted after epoch 2: both drops still ahead, scaled to the new length
    assert _shrunk_milestones([20, 40], [10, 20], passed=2, end=30) == [10, 20]
    # ending at the current epoch leaves no drop after the end
    assert _shrunk_milestones([2, 4], [1], passed=1, end=1) == []


def test_a_session_stopped_early_validates_the_same_epochs_as_an_uninterrupted_run(
    tiny_data: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, epochs=4, val_every=2)
    train(config, tmp_path / "full", progress=False)
    train(config, tmp_path / "parted", progress=False, stop_after_epoch=1)
    train(config, tmp_path / "parted", resume=True, progress=False)
    validated = {
        run: [h["epoch"] for h in _history(tmp_path / run) if h["val"] is not None]
        for run in ("full", "parted")
    }
    assert validated == {"full": [2, 4], "parted": [2, 4]}


@pytest.fixture(scope="module")
def first_stage(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of a one-epoch run, for the runs that start from it."""
    first = tmp_path_factory.mktemp("first")
    train(tiny_config(tiny_data, epochs=1), first, progress=False)
    return first / "checkpoints" / "last.pt"


def test_a_run_keeps_the_sha256_of_its_initial_weights_across_resume(
    tiny_data: Path, first_stage: Path, tmp_path: Path
) -> None:
    # radnet-export checks it before it borrows the history in a card beside the initial weights
    config = tiny_config(tiny_data, epochs=2, init_from=str(first_stage))
    run = tmp_path / "run"
    train(config, run, progress=False, stop_after_epoch=1)
    train(config, run, resume=True, progress=False)
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(run / "checkpoints" / name)["init_sha256"] == sha256_of(first_stage)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_init_from_starts_a_new_run_from_a_checkpoint_or_exported_weights(
    tiny_data: Path, first_stage: Path, tmp_path: Path
) -> None:
    stage1 = load_checkpoint(first_stage)["model_state"]
    # one epoch at a negligible learning rate: the new run starts where stage 1 ended
    frozen = tiny_config(tiny_data, epochs=1, init_from=str(first_stage))
    optim = frozen.to_dict()["optim"] | {"lr": 1e-12}
    frozen = validate_config(frozen.to_dict() | {"optim": optim})
    train(frozen, tmp_path / "second", progress=False)
    stage2 = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")["model_state"]
    weights = [k for k in stage1 if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(stage1[k], stage2[k], atol=1e-8) for k in weights)
    exported = tmp_path / "w.pt"
    export_weights(
        _model_from(stage1), exported, name="tiny", version="0.0.1",
        preprocess=PreprocessSpec(**TINY_PREPROCESS), threshold=0.5, min_consecutive_slices=3,
        training_data={}, training={}, metrics={}, limitations=["test only"],
    )  # fmt: skip
    third = tmp_path / "third"
    train(validate_config(frozen.to_dict() | {"train": {**frozen.to_dict()["train"],
          "init_from": str(exported)}}), third, progress=False)  # fmt: skip
    stage3 = load_checkpoint(third / "checkpoints" / "last.pt")["model_state"]
    assert all(torch.allclose(stage1[k], stage3[k], atol=1e-8) for k in weights)
    # the control: the same run without init_from does not end where stage 1 ended
    control = validate_config(frozen.to_dict() | {"train": {**frozen.to_dict()["train"],
              "init_from": None}})  # fmt: skip
    train(control, tmp_path / "control", progress=False)
    fresh = load_checkpoint(tmp_path / "control" / "checkpoints" / "last.pt")["model_state"]
    assert not all(torch.allclose(stage1[k], fresh[k], atol=1e-8) for k in weights)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RadnetError, match="bad.pt: train.init_from: cannot read"):
        train(tiny_config(tiny_data, init_from=str(bad)), tmp_path / "fourth", progress=False)
    other = tiny_config(tiny_data, init_from=str(first_stage))
    other = validate_config(other.to_dict() | {"model": {**TINY_MODEL, "growth_rate": 6}})
    with pytest.raises(RadnetError, match="do not fit the configured model"):
        train(other, tmp_path / "fifth", progress=False)


def test_head_only_training_changes_the_sequence_head_and_nothing_else(
    tiny_data: Path, first_stage: Path, tmp_path: Path
) -> None:
    start = load_checkpoint(first_stage)["model_state"]
    head_config = tiny_config(tiny_data, epochs=2, init_from=str(first_stage), trainable="head")
    train(head_config, tmp_path / "head", progress=False)
    end = load_checkpoint(tmp_path / "head" / "checkpoints" / "last.pt")["model_state"]
    head = [k for k in start if k.startswith(("lstm.", "classifier."))]
    encoder = [k for k in start if k not in head]
    assert head and encoder
    assert all(torch.equal(start[k], end[k]) for k in encoder)  # batch-norm statistics included
    assert not all(torch.equal(start[k], end[k]) for k in head)


def _model_from(state: dict[str, torch.Tensor]) -> RADnet:
    config = model_config_for(tiny_config(Path("unused")))
    model = RADnet(config)
    model.load_state_dict(state)
    return model


def test_val_every_skips_validation_but_always_validates_the_last_epoch(
    tiny_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "sparse"
    result = train(tiny_config(tiny_data, epochs=3, val_every=2), run, progress=False)
    validated = [h["val"] is not None for h in _history(run)]
    assert validated == [False, True, True]
    assert result.best_epoch in (2, 3)


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsequence_lenght = 4\n", encoding="utf-8")
    app = typer.Typer()
    app.command()(_cli)
    result = CliRunner().invoke(
        app, ["--config", str(bad), "--data", "layout:/nowhere", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "unknown key 'train.sequence_lenght'" in result.output
    assert "Traceback" not in result.output


def test_cli_trains_and_resume_refuses_changed_recipe(tiny_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[model]\ngrowth_rate = 4\nlayers_per_block = 1\nstem_channels = 4\nlstm_hidden = 4\n"
        "[preprocess]\nfield_of_view_mm = 64.0\npixel_spacing_mm = 2.0\nmin_slices = 3\n"
        '[train]\nsequence_length = 4\nthreads = 1\nprecision = "fp32"\n',
        encoding="utf-8",
    )
    app = typer.Typer()
    app.command()(_cli)
    run = tmp_path / "cli-run"
    args = ["--config", str(config), "--data", f"layout:{tiny_data}", "--out", str(run)]
    result = CliRunner().invoke(
        app, [*args, "--epochs", "2", "--epoch-size", "2", "--stop-after-epoch", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "best epoch 1" in result.output
    refused = CliRunner().invoke(app, ["--out", str(run), "--resume", "--epochs", "5"])
    assert refused.exit_code == 2 and "drop --epochs" in refused.output
    resumed = CliRunner().invoke(app, ["--out", str(run), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert [h["epoch"] for h in _history(run)] == [1, 2]


def test_training_case_type_is_frozen() -> None:
    case = to_training_case(_case("x", [0, 0], 0))
    assert isinstance(case, TrainingCase)
    with pytest.raises(AttributeError):
        case.ct_label = 1  # type: ignore[misc]


@pytest.mark.slow
def test_training_learns_the_tiny_bright_blob_task(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 16, seed=5)
    config = tiny_config(data, epochs=12, epoch_size=16)
    config = config.model_copy(
        update={
            "model": config.model.model_copy(
                update={"growth_rate": 8, "layers_per_block": 2, "stem_channels": 8}
            ),
            "optim": config.optim.model_copy(update={"lr": 0.05}),
        }
    )
    train(config, tmp_path / "run", progress=False)
    history = _history(tmp_path / "run")
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val"]["slice"]["auc"] >= 0.9
    assert history[-1]["val"]["dice"]["mean"] > 0.5


# ----------------------------------------------------------------------------- shipped-run options


def test_min_blood_pixels_leaves_specks_of_blood_out_of_the_slice_loss() -> None:
    image = np.zeros((3, 8, 8), np.float32)
    mask = np.zeros((3, 8, 8), np.uint8)
    mask[0, :2, :2] = 1  # 4 px: a speck
    mask[1, :4, :4] = 1  # 16 px
    case = Case("s", image, np.array([1, 1, 0], np.int8), mask, 1, "layout")
    assert to_training_case(case, min_blood_pixels=10).slice_labels.tolist() == [-1, 1, 0]
    assert to_training_case(case).slice_labels.tolist() == [1, 1, 0]
    assert to_training_case(case, min_blood_pixels=10).mask_known.all()  # masks still train


def test_optimizer_is_sgd_by_default_and_adamw_on_request(tiny_data: Path) -> None:
    model = torch.nn.Linear(2, 1)
    sgd = _optimizer(list(model.parameters()), tiny_config(tiny_data))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9
    adamw_config = load_config(None, {"optim": {"optimizer": "adamw", "lr": 1e-3}})
    adamw = _optimizer(list(model.parameters()), adamw_config)
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(None, {"optim": {"optimizer": "adam"}})


def test_crop_batch_keeps_the_blood_and_rederives_slice_labels() -> None:
    images = torch.zeros(1, 3, 64, 64)
    masks = torch.zeros(1, 3, 64, 64)
    masks[0, 1, 50:56, 50:56] = 1.0  # 36 px of blood on slice 1, near a corner
    masks[0, 2, 50:52, 50:52] = 1.0  # a 4 px speck on slice 2
    images[masks > 0] = 0.9
    known = torch.ones(1, 3, dtype=torch.bool)
    batch = Batch(images, torch.tensor([[0.0, 1.0, 1.0]]), masks, known)
    for seed in range(5):
        cropped = crop_batch(batch, 24, np.random.default_rng(seed), min_blood_pixels=10)
        assert cropped.images.shape == (1, 3, 24, 24)
        assert cropped.masks[0, 1].sum() > 0  # the crop is placed on the blood
        assert torch.equal(cropped.images > 0.5, cropped.masks > 0)  # image and mask stay aligned
        assert cropped.slice_labels[0, 0] == 0.0
        assert cropped.slice_labels[0, 1] == (1.0 if cropped.masks[0, 1].sum() >= 10 else -1.0)
        assert cropped.slice_labels[0, 2] in (-1.0, 0.0)  # a speck, or outside the crop
    assert crop_batch(batch, 64, np.random.default_rng(0), 10) is batch  # no crop at full size


def test_load_workers_load_the_same_cases_in_the_same_order(tiny_data: Path) -> None:
    config = tiny_config(tiny_data)
    data = open_training_data(config)
    ids = sorted(data.case_ids())
    serial, skipped_serial = load_cases(data, ids, "float32", desc="", progress=False)
    parallel, skipped_parallel = load_cases(
        data, ids, "float32", desc="", progress=False, workers=2
    )
    assert [c.case_id for c in parallel] == [c.case_id for c in serial]
    assert (
        [s.case_id for s in skipped_parallel] == [s.case_id for s in skipped_serial] == ["broken"]
    )
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.slice_labels, b.slice_labels)


def test_one_loader_pool_serves_training_and_validation_with_their_own_label_rules(
    tiny_data: Path,
) -> None:
    config = tiny_config(tiny_data)
    data = open_training_data(config)
    ids = sorted(i for i in data.case_ids() if i != "broken")
    rule = 10**6  # more blood than any slice has: every positive slice label becomes unknown
    with CaseLoader(data, "float32", workers=2, progress=False) as loader:
        strict, _ = loader.load(ids, desc="", min_blood_pixels=rule)
        pool = loader._pool
        plain, _ = loader.load(ids, desc="")
        assert pool is not None and loader._pool is pool  # started once, used twice
    assert loader._pool is None  # closed on leaving
    serial, _ = load_cases(data, ids, "float32", desc="", progress=False, min_blood_pixels=rule)
    assert any((c.slice_labels == 1).any() for c in plain)
    assert not any((c.slice_labels == 1).any() for c in strict)
    for a, b in zip(strict, serial, strict=True):
        assert np.array_equal(a.slice_labels, b.slice_labels)


def test_keep_split_keeps_earlier_sides_and_splits_only_new_cases(
    tiny_data: Path, tmp_path: Path
) -> None:
    def config_for(*folders: Path, keep_split: Path | None = None) -> TrainConfig:
        split = None if keep_split is None else str(keep_split)
        data = {"specs": [f"layout:{f}" for f in folders], "keep_split": split}
        return validate_config(tiny_config(tiny_data).to_dict() | {"data": data})

    more = write_tiny_layout(tmp_path / "more", 6, seed=2)
    first = config_for(tiny_data, more)
    before = split_cases(open_training_data(first), first)
    earlier = tmp_path / "split.json"
    earlier.write_text(json.dumps(before), encoding="utf-8")
    added = write_tiny_layout(tmp_path / "added", 10, seed=3)
    second = config_for(tiny_data, more, added, keep_split=earlier)
    data = open_training_data(second)
    after = split_cases(data, second)
    assert after["train"][: len(before["train"])] == before["train"]
    assert after["val"][: len(before["val"])] == before["val"]
    assert not set(after["train"]) & set(after["val"])
    assert set(after["train"]) | set(after["val"]) == set(data.case_ids())
    new_val = after["val"][len(before["val"]) :]
    assert all(c.startswith("layout-3/") for c in new_val) and 0 < len(new_val) < 10
    # without keep_split the same data is reshuffled: earlier validation cases reach training
    reshuffled = split_cases(data, config_for(tiny_data, more, added))
    assert set(reshuffled["train"]) & set(before["val"])
    # a split that names a case the data lacks is refused with the file named
    earlier.write_text(json.dumps({"train": ["nowhere/x"], "val": []}), encoding="utf-8")
    with pytest.raises(ConfigError, match="split.json.*1 case"):
        split_cases(data, second)
