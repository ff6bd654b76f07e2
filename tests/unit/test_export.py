"""radnet-export: a training run becomes a weights file whose model card says what it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from test_train import tiny_config
from tiny_layout import write_tiny_layout
from typer.testing import CliRunner

from radnet_node.weights import load_model
from training.export import app
from training.train import load_checkpoint, train

torch.set_num_threads(1)


def export_run(run: Path, out: Path, version: str) -> None:
    """radnet-export of ``run`` to ``out``, which must succeed."""
    result = CliRunner().invoke(app, ["--run", str(run), "--out", str(out), "--version", version])
    assert result.exit_code == 0, result.output


def fine_tuned_from_export(
    tmp_path: Path, data: Path, *, first_epochs: int = 1, version: str = "1"
) -> tuple[Path, Path]:
    """A run exported as weights (``shipped/radnet.pt``, card ``version``) and a second run
    (``second``) of one epoch that starts from those weights; returns both."""
    first = tmp_path / "first"
    train(tiny_config(data, epochs=first_epochs), first, progress=False)
    shipped = tmp_path / "shipped" / "radnet.pt"
    export_run(first, shipped, version)
    second = tmp_path / "second"
    train(tiny_config(data, epochs=1, init_from=str(shipped)), second, progress=False)
    return shipped, second


def test_export_writes_weights_that_load_and_a_card_built_from_the_run(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 6)
    run = tmp_path / "run"
    train(tiny_config(data), run, progress=False)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"ct": {"recall": 1.0, "precision": 0.5}}))
    out = tmp_path / "weights" / "radnet.pt"

    result = CliRunner().invoke(
        app,
        [
            "--run",
            str(run),
            "--out",
            str(out),
            "--version",
            "9.9.9",
            "--metrics",
            f"held_out={metrics}",
            "--min-extent-mm",
            "12",
        ],
    )

    assert result.exit_code == 0, result.output
    model, card = load_model(out)
    assert card.version == "9.9.9"
    assert card.min_positive_extent_mm == 12.0
    assert card.metrics["held_out"]["ct"]["recall"] == 1.0
    assert card.training_data["datasets"][0]["cases"] == 6
    assert card.training_data["datasets"][0]["positive_cases"] == 3
    assert card.training["epochs"] == 2
    assert "not a medical device" in card.intended_use.lower()
    checkpoint = load_checkpoint(run / "checkpoints" / "best.pt")
    for key, value in checkpoint["model_state"].items():
        assert torch.equal(
            model.state_dict()[key], value.float() if value.is_floating_point() else value
        )


def test_card_records_every_stage_of_a_fine_tuned_run(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 6)
    first = tmp_path / "first"
    train(tiny_config(data, epochs=2), first, progress=False)
    second = tmp_path / "second"
    init = str(first / "checkpoints" / "best.pt")
    train(tiny_config(data, epochs=1, init_from=init, trainable="head"), second, progress=False)
    out = tmp_path / "w.pt"
    result = CliRunner().invoke(app, ["--run", str(second), "--out", str(out), "--version", "2"])
    assert result.exit_code == 0, result.output
    _, card = load_model(out)
    stages = card.training["stages"]
    assert [s["run"] for s in stages] == [str(first), str(second)]
    assert [s["epochs"] for s in stages] == [2, 1]
    assert card.training["epochs"] == 3
    assert stages[0]["recipe"].endswith("from He initialisation")
    assert stages[1]["recipe"].endswith(f"trainable: head, from {init}")
    assert "sgd lr 0.01 momentum 0.9, lr x0.1 at 0.333, 0.667 of 2 epochs" in stages[0]["recipe"]


def test_export_names_a_missing_metrics_file(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 4)
    run = tmp_path / "run"
    train(tiny_config(data, epochs=1), run, progress=False)
    result = CliRunner().invoke(
        app,
        [
            "--run",
            str(run),
            "--out",
            str(tmp_path / "w.pt"),
            "--version",
            "1",
            "--metrics",
            "held_out=/nonexistent.json",
        ],
    )
    assert result.exit_code == 2
    assert "/nonexistent.json" in result.output
    assert not (tmp_path / "w.pt").exists()


def test_card_of_weights_fine_tuned_from_exported_weights_keeps_their_history(
    tmp_path: Path,
) -> None:
    data = write_tiny_layout(tmp_path / "data", 6)
    shipped, second = fine_tuned_from_export(tmp_path, data, first_epochs=2)
    first = tmp_path / "first"  # the run exported as ``shipped``
    out = tmp_path / "w2.pt"

    result = CliRunner().invoke(app, ["--run", str(second), "--out", str(out), "--version", "2"])

    assert result.exit_code == 0, result.output
    _, card = load_model(out)
    _, first_card = load_model(shipped)
    stages = card.training["stages"]
    assert [s["run"] for s in stages] == [str(first), str(second)]
    assert stages[0]["from_card"] == {"name": first_card.name, "version": "1",
                                      "sha256": first_card.sha256}  # fmt: skip
    assert "from_card" not in stages[1] and "previous_stage_missing" not in stages[1]
    assert card.training["epochs"] == 3
    earlier = card.training_data["initial_weights"]
    assert earlier["version"] == "1" and earlier["sha256"] == first_card.sha256
    assert earlier["training_data"]["datasets"][0]["cases"] == 6


def test_card_does_not_borrow_the_history_of_weights_replaced_since_training(
    tmp_path: Path,
) -> None:
    data = write_tiny_layout(tmp_path / "data", 6)
    first, other = tmp_path / "first", tmp_path / "other"
    train(tiny_config(data, epochs=1), first, progress=False)
    train(tiny_config(data, epochs=2, seed=7), other, progress=False)
    shipped = tmp_path / "shipped" / "radnet.pt"
    export_run(first, shipped, "1")
    second = tmp_path / "second"
    train(tiny_config(data, epochs=1, init_from=str(shipped)), second, progress=False)
    # the next release overwrites the shipped file: its card now describes other weights
    export_run(other, shipped, "2")
    out = tmp_path / "w3.pt"

    result = CliRunner().invoke(app, ["--run", str(second), "--out", str(out), "--version", "3"])

    assert result.exit_code == 0, result.output
    _, card = load_model(out)
    stages = card.training["stages"]
    assert [s["run"] for s in stages] == [str(second)]
    assert stages[0]["previous_stage_missing"] is True
    assert "no longer holds the weights" in stages[0]["initial_weights_replaced"]
    assert "initial_weights" not in card.training_data


def test_card_chain_keeps_each_stage_with_the_card_it_came_from(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 6)
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    w1, w2 = tmp_path / "w1" / "radnet.pt", tmp_path / "w2" / "radnet.pt"
    train(tiny_config(data, epochs=1), first, progress=False)
    export_run(first, w1, "1")
    train(tiny_config(data, epochs=1, init_from=str(w1)), second, progress=False)
    export_run(second, w2, "2")
    train(tiny_config(data, epochs=1, init_from=str(w2)), third, progress=False)
    out = tmp_path / "w3.pt"

    result = CliRunner().invoke(app, ["--run", str(third), "--out", str(out), "--version", "3"])

    assert result.exit_code == 0, result.output
    stages = load_model(out)[1].training["stages"]
    assert [s["run"] for s in stages] == [str(first), str(second), str(third)]
    assert [s.get("from_card", {}).get("version") for s in stages] == ["1", "2", None]


def test_card_that_lists_the_run_itself_is_not_its_history(tmp_path: Path) -> None:
    # a run from before checkpoints kept init_sha256, whose initial weights file was later
    # overwritten by its own export: the card there describes this run, not where it started
    data = write_tiny_layout(tmp_path / "data", 6)
    shipped, second = fine_tuned_from_export(tmp_path, data)
    for name in ("best.pt", "last.pt"):
        path = second / "checkpoints" / name
        state = torch.load(path, weights_only=False)
        del state["init_sha256"]
        torch.save(state, path)
    export_run(second, shipped, "2")
    out = tmp_path / "again.pt"

    result = CliRunner().invoke(app, ["--run", str(second), "--out", str(out), "--version", "2b"])

    assert result.exit_code == 0, result.output
    _, card = load_model(out)
    assert [s["run"] for s in card.training["stages"]] == [str(second)]
    assert card.training["stages"][0]["previous_stage_missing"] is True
    assert "initial_weights" not in card.training_data


def test_a_runs_millimetre_rule_drives_validation_and_goes_into_the_card(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 6)
    run = tmp_path / "run"
    train(tiny_config(data, epochs=1, min_extent_mm=20.0), run, progress=False)
    checkpoint = load_checkpoint(run / "checkpoints" / "best.pt")
    assert checkpoint["min_extent_mm"] == 20.0
    validation = checkpoint["validation"]
    assert validation["min_positive_extent_mm"] == 20.0
    # the tiny cases are 5 mm apart: 20 mm asks each of them for 4 consecutive slices, not 3
    assert {case["slices_needed"] for case in validation["cases"]} == {4}
    export_run(run, tmp_path / "w" / "rule.pt", "1.0.0")
    assert load_model(tmp_path / "w" / "rule.pt")[1].min_positive_extent_mm == 20.0
    result = CliRunner().invoke(
        app,
        ["--run", str(run), "--out", str(tmp_path / "w" / "off.pt"), "--version", "1.0.0"]
        + ["--min-extent-mm", "0"],
    )
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "w" / "off.pt")[1].min_positive_extent_mm is None


def test_export_can_average_the_run_with_exported_weights(tmp_path: Path) -> None:
    # a "model soup": weights fine-tuned from exported weights, averaged with those weights
    data = write_tiny_layout(tmp_path / "data", 6)
    base, second = fine_tuned_from_export(tmp_path, data, version="1.0.0")
    out = tmp_path / "soup.pt"
    arguments = ["--run", str(second), "--out", str(out), "--version", "1.1.0"]

    result = CliRunner().invoke(app, [*arguments, "--average-with", str(base)])

    assert result.exit_code == 0, result.output
    soup, card = load_model(out)
    base_model, base_card = load_model(base)
    run_state = load_checkpoint(second / "checkpoints" / "best.pt")["model_state"]
    changed = 0
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            expected = (run_state[key].float() + base_model.state_dict()[key].float()) / 2
            assert torch.allclose(value, expected), key
            changed += int(not torch.equal(value, run_state[key].float()))
        else:
            assert torch.equal(value, run_state[key]), key
    assert changed > 0  # the run did move away from the base, so the average differs from both
    assert card.training["averaged_with"] == [
        {"path": str(base), "name": base_card.name, "version": "1.0.0", "sha256": base_card.sha256}
    ]
    assert card.training["stages"][-1]["averaged_with"] == card.training["averaged_with"]
    assert "validation_best_epoch" not in card.metrics
    assert "validation_best_epoch_before_averaging" in card.metrics
    assert f"uniform average of its weights and {base_card.name} 1.0.0" in card.training["recipe"]


def _variant_of(config: Any, section: str, **changes: Any) -> Any:
    """``config`` with some keys of one section changed."""
    data = config.to_dict()
    return type(config).model_validate({**data, section: {**data[section], **changes}})


def test_export_averages_only_weights_of_the_same_architecture_and_preprocessing(
    tmp_path: Path,
) -> None:
    data = write_tiny_layout(tmp_path / "data", 4)
    run = tmp_path / "run"
    train(tiny_config(data, epochs=1), run, progress=False)
    others = {
        # the same tiny network without its auxiliary heads and LSTM: other tensors
        "model": _variant_of(tiny_config(data, epochs=1), "model", variant="densenet"),
        # the same network trained on another window: the same tensors, other inputs
        "preprocessing": _variant_of(
            tiny_config(data, epochs=1), "preprocess", window_level_hu=60.0
        ),
    }
    for what, config in others.items():
        other_run = tmp_path / f"other-{what}"
        train(config, other_run, progress=False)
        other = tmp_path / f"{what}.pt"
        export_run(other_run, other, "0.1.0")
        out = tmp_path / f"w-{what}.pt"

        result = CliRunner().invoke(
            app,
            ["--run", str(run), "--out", str(out), "--version", "1", "--average-with", str(other)],
        )

        assert result.exit_code == 2, what
        assert f"its {what} differs from the run's" in result.output
        assert not out.exists()


def test_card_recipe_says_when_a_time_limit_shrank_the_schedule(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 4)
    run = tmp_path / "run"
    # six epochs planned (drops after 2 and 4); a spent time limit ends the run after the first
    train(tiny_config(data, epochs=6), run, progress=False, time_limit_s=1e-6)
    out = tmp_path / "w.pt"
    export_run(run, out, "1")
    _, card = load_model(out)
    recipe = card.training["stages"][0]["recipe"]
    assert "lr x0.1 at 0.333, 0.667 of 6 epochs; a time limit ended the run early" in recipe
    assert "before its first drop" in recipe
    assert card.training["epochs"] == 1
