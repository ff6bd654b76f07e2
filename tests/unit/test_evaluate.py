"""Tests of radnet-eval: CT-level metrics, the layout of Tables 1 and 2, reports, ablation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_train import tiny_config
from tiny_layout import TINY_MODEL, TINY_PREPROCESS, write_tiny_layout
from typer.testing import CliRunner

from radnet_node.preprocess import PreprocessSpec
from radnet_node.weights import export_weights
from training.config import load_config
from training.evaluate import app, format_table, load_for_evaluation, reader_table
from training.inference import CaseResult, binary_metrics, dice_score, summarize
from training.train import train

torch.set_num_threads(1)

TINY_TOML = (
    "[model]\ngrowth_rate = 4\nlayers_per_block = 1\nstem_channels = 4\nlstm_hidden = 4\n"
    "[preprocess]\nfield_of_view_mm = 64.0\npixel_spacing_mm = 2.0\nmin_slices = 3\n"
    '[train]\nsequence_length = 4\nepoch_size = 3\nthreads = 1\nprecision = "fp32"\n'
)


def _result(
    case_id: str,
    ct_label: int,
    probs: list[float],
    labels: list[int],
    *,
    dice: float | None = None,
    readers: dict[str, int] | None = None,
    spacing: float = float("nan"),
) -> CaseResult:
    return CaseResult(
        case_id,
        ct_label,
        np.array(probs, np.float32),
        np.array(labels, np.int8),
        dice,
        readers or {},
        spacing,
    )


# ----------------------------------------------------------------------------- metrics


def test_binary_metrics_match_hand_counted_confusion() -> None:
    metrics = binary_metrics([1, 1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 1, 0])
    assert (metrics.tp, metrics.fn, metrics.fp, metrics.tn) == (3, 1, 1, 2)
    assert metrics.accuracy == pytest.approx(5 / 7)
    assert metrics.recall == pytest.approx(0.75)
    assert metrics.precision == pytest.approx(0.75)
    assert metrics.f1 == pytest.approx(0.75)


def test_binary_metrics_reproduce_the_papers_radnet_column() -> None:
    # Table 2: 44 hemorrhage + 33 normal CTs; RADnet 39 TP, 5 FN, 9 FP, 24 TN
    truth = [1] * 44 + [0] * 33
    pred = [1] * 39 + [0] * 5 + [1] * 9 + [0] * 24
    metrics = binary_metrics(truth, pred)
    assert f"{100 * metrics.accuracy:.2f}" == "81.82"
    assert f"{100 * metrics.recall:.2f}" == "88.64"
    assert f"{100 * metrics.precision:.2f}" == "81.25"
    assert f"{100 * metrics.f1:.2f}" == "84.78"


def test_binary_metrics_without_predicted_positives_report_zero_not_nan() -> None:
    metrics = binary_metrics([1, 0, 0], [0, 0, 0])
    assert (metrics.precision, metrics.recall, metrics.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics([1, 2], [0, 1])
    with pytest.raises(ValueError, match="equal"):
        binary_metrics([1, 0], [0])


def test_dice_score() -> None:
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True  # 4 px
    b[0, :2, :3] = True  # 6 px, 4 shared
    assert dice_score(a, b) == pytest.approx(8 / 10)
    assert dice_score(np.zeros(3), np.zeros(3)) == 1.0


def test_summarize_applies_the_consecutive_slice_rule_and_counts() -> None:
    results = [
        _result("tp", 1, [0.1, 0.8, 0.9, 0.7, 0.2], [0, 1, 1, 1, 0], dice=0.5),
        _result("fn", 1, [0.9, 0.9, 0.1, 0.9, 0.1], [1, 1, 0, 1, 0], dice=0.1),  # runs of 2, 1
        _result("fp", 0, [0.6, 0.6, 0.6, 0.1, 0.1], [0, 0, 0, 0, 0]),
        _result("tn", 0, [0.1, 0.2, 0.9, 0.3, 0.1], [0, 0, 0, 0, -1]),
    ]
    summary = summarize(results, threshold=0.5, min_consecutive=3)
    ct = summary["ct"]
    assert (ct["tp"], ct["fn"], ct["fp"], ct["tn"]) == (1, 1, 1, 1)
    assert [c["decision"] for c in summary["cases"]] == [1, 0, 1, 0]
    assert [c["ct_score"] for c in summary["cases"]] == pytest.approx([0.7, 0.1, 0.6, 0.2])
    assert summary["ct_auc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.7, 0.1, 0.6, 0.2]))
    labels = np.array([0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    probs = np.array(
        [
            0.1,
            0.8,
            0.9,
            0.7,
            0.2,
            0.9,
            0.9,
            0.1,
            0.9,
            0.1,
            0.6,
            0.6,
            0.6,
            0.1,
            0.1,
            0.1,
            0.2,
            0.9,
            0.3,
        ]
    )  # the unknown last slice is left out
    assert summary["slice"]["n"] == 19
    assert summary["slice"]["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert summary["dice"] == {"mean": pytest.approx(0.3), "n": 2}
    # "fn" has blood on runs of 2 and 1 slices: the 3-slice rule cannot call it on its own slices
    assert summary["short_blood"] == {"n": 1, "missed": 1, "case_ids": ["fn"]}


def test_short_blood_runs_follow_min_consecutive_and_skip_unknown_labels() -> None:
    results = [
        _result("two", 1, [0.9, 0.9, 0.9, 0.1], [0, 1, 1, 0]),  # called through its neighbour
        _result("three", 1, [0.1, 0.1, 0.1, 0.1], [1, 1, 1, 0]),
        _result("unknown", 1, [0.1, 0.1, 0.1, 0.1], [1, -1, -1, -1]),
        _result("neg", 0, [0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0]),
    ]
    assert summarize(results, min_consecutive=3)["short_blood"] == {
        "n": 1,
        "missed": 0,
        "case_ids": ["two"],
    }
    assert summarize(results, min_consecutive=4)["short_blood"]["case_ids"] == ["two", "three"]
    assert summarize(results, min_consecutive=2)["short_blood"]["n"] == 0


def test_the_millimetre_rule_asks_each_ct_for_the_slices_its_spacing_needs() -> None:
    five = [0.1, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1]  # 4 positive slices in a row
    results = [
        _result("thick", 1, five, [0, 1, 1, 1, 1, 0, 0], spacing=5.0),  # 20 mm: needs 3
        _result("thin", 0, five, [0, 0, 0, 0, 0, 0, 0], spacing=2.0),  # 8 mm: needs 7
        _result("unknown", 0, five, [0, 0, 0, 0, 0, 0, 0]),  # no spacing: the slice count
    ]
    plain = summarize(results, threshold=0.5, min_consecutive=3)
    assert [c["decision"] for c in plain["cases"]] == [1, 1, 1]
    assert plain["min_positive_extent_mm"] is None
    ruled = summarize(results, threshold=0.5, min_consecutive=3, min_extent_mm=14.0)
    assert ruled["min_positive_extent_mm"] == 14.0
    assert [c["slices_needed"] for c in ruled["cases"]] == [3, 7, 3]
    assert [c["decision"] for c in ruled["cases"]] == [1, 0, 1]
    assert [c["slice_spacing_mm"] for c in ruled["cases"]] == [5.0, 2.0, None]
    assert [c["ct_score"] for c in ruled["cases"]] == pytest.approx([0.9, 0.1, 0.9])
    # a bleed on 4 slices of 2 mm is short of a 14 mm rule, and counted as such
    thin_bleed = _result("small", 1, five, [0, 1, 1, 1, 1, 0, 0], spacing=2.0)
    assert summarize([thin_bleed], min_extent_mm=14.0)["short_blood"]["case_ids"] == ["small"]
    assert summarize([thin_bleed])["short_blood"]["n"] == 0


def test_summarize_reports_undefined_auc_as_none() -> None:
    summary = summarize([_result("a", 0, [0.1, 0.2, 0.3], [0, 0, 0])])
    assert summary["slice"]["auc"] is None and summary["ct_auc"] is None
    with pytest.raises(ValueError, match="no evaluated cases"):
        summarize([])


def test_tables_follow_the_papers_layout() -> None:
    table = format_table(
        {
            "DenseNet": binary_metrics([1, 1, 0, 0], [1, 0, 0, 1]).to_dict(),
            "DenseNet-A": binary_metrics([1, 1, 0, 0], [1, 1, 0, 1]).to_dict(),
            "RADnet": binary_metrics([1, 1, 0, 0], [1, 1, 0, 0]).to_dict(),
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| | DenseNet | DenseNet-A | RADnet |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| Accuracy",
        "| Recall",
        "| Precision",
        "| F1 score",
    ]
    assert lines[2] == "| Accuracy | 50.00% | 75.00% | 100.00% |"
    assert lines[4] == "| Precision | 50.00% | 66.67% | 100.00% |"


def test_reader_table_scores_each_reader_against_the_reference() -> None:
    results = [
        _result("a", 1, [0.9, 0.9, 0.9], [-1] * 3, readers={"R1": 1, "R2": 0}),
        _result("b", 1, [0.1, 0.1, 0.1], [-1] * 3, readers={"R1": 1, "R2": 1}),
        _result("c", 0, [0.1, 0.1, 0.1], [-1] * 3, readers={"R1": 1, "R2": 0}),
    ]
    columns, n = reader_table(results, 0.5, 3)
    assert n == 3 and list(columns) == ["Rad. 1", "Rad. 2", "RADnet"]
    assert (columns["Rad. 1"]["tp"], columns["Rad. 1"]["fp"]) == (2, 1)
    assert (columns["Rad. 2"]["tp"], columns["Rad. 2"]["fn"]) == (1, 1)
    assert (columns["RADnet"]["tp"], columns["RADnet"]["fn"], columns["RADnet"]["tn"]) == (1, 1, 1)
    assert reader_table([_result("x", 0, [0.1], [0])], 0.5, 3) is None


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    data = write_tiny_layout(root / "data", 6, bad_cases=("broken",), seed=1)
    config = load_config(
        None,
        {
            "model": TINY_MODEL,
            "preprocess": TINY_PREPROCESS,
            "data": {"specs": [f"layout:{data}"]},
            "train": {
                "epochs": 1,
                "sequence_length": 4,
                "epoch_size": 3,
                "threads": 1,
                "precision": "fp32",
            },
        },
    )
    train(config, root / "run", progress=False)
    return data, root / "run"


def test_eval_command_writes_json_and_png(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = tiny_run
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "--checkpoint",
            str(run / "checkpoints" / "best.pt"),
            "--out",
            str(out),
            "--quiet",
            "--precision",
            "fp32",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| Accuracy |" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert metrics["split"] == "val"
    assert metrics["ct"]["n"] + metrics["skipped_cases"] == len(split["val"])
    ct = metrics["ct"]
    assert ct["tp"] + ct["fp"] + ct["tn"] + ct["fn"] == ct["n"]
    assert {"auc", "n"} <= set(metrics["slice"]) and "ct_auc" in metrics
    png = (out / "roc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_of_a_weights_file_with_card_on_all_cases(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = tiny_run
    loaded = load_for_evaluation(run / "checkpoints" / "best.pt")
    weights = tmp_path / "w" / "tiny.pt"
    export_weights(
        loaded.model,
        weights,
        name="tiny",
        version="0",
        preprocess=PreprocessSpec(**TINY_PREPROCESS),
        threshold=0.5,
        min_consecutive_slices=3,
        training_data={},
        training={},
        metrics={},
        limitations=[],
        min_positive_extent_mm=12.0,
    )
    refused = CliRunner().invoke(app, ["--checkpoint", str(weights), "--data", f"layout:{data}"])
    assert refused.exit_code == 2 and "--split all" in refused.output
    out = tmp_path / "eval-all"
    result = CliRunner().invoke(
        app,
        [
            "--checkpoint",
            str(weights),
            "--data",
            f"layout:{data}",
            "--split",
            "all",
            "--out",
            str(out),
            "--quiet",
            "--min-consecutive",
            "2",
            "--precision",
            "fp32",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["ct"]["n"], metrics["skipped_cases"]) == (6, 1)
    assert metrics["skipped"][0]["case_id"] == "broken"
    assert metrics["min_consecutive"] == 2
    assert (out / "roc.png").is_file()
    # the card's millimetre rule applies: each case needs the slices its own spacing asks for
    assert metrics["min_positive_extent_mm"] == 12.0
    for case in metrics["cases"]:
        assert case["slices_needed"] == max(2, math.ceil(12.0 / case["slice_spacing_mm"] - 1e-6))
    off = CliRunner().invoke(
        app,
        ["--checkpoint", str(weights), "--data", f"layout:{data}", "--split", "all"]
        + ["--out", str(out), "--quiet", "--precision", "fp32", "--min-extent-mm", "0"],
    )
    assert off.exit_code == 0, off.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["min_positive_extent_mm"] is None
    assert {case["slices_needed"] for case in metrics["cases"]} == {3}


def test_eval_on_the_validation_split_of_another_run(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    # weights trained elsewhere (other data) are compared on an earlier run's validation cases:
    # the case ids and the data specs both come from that run's folder, not from the checkpoint
    _, run = tiny_run
    other_data = write_tiny_layout(tmp_path / "other-data", 4, seed=9)
    other_run = tmp_path / "other-run"
    train(tiny_config(other_data, epochs=1), other_run, progress=False)
    checkpoint = other_run / "checkpoints" / "best.pt"
    val_ids = json.loads((run / "split.json").read_text())["val"]
    out = tmp_path / "eval-other"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--quiet", "--precision", "fp32"]

    result = CliRunner().invoke(app, [*args, "--split-file", str(run / "split.json")])

    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(c["case_id"] for c in metrics["cases"]) == sorted(val_ids)
    assert metrics["split"] == f"val of {run / 'split.json'}"
    assert metrics["data"] == json.loads((run / "config.json").read_text())["data"]["specs"]

    both = CliRunner().invoke(
        app, [*args, "--split-file", str(run / "split.json"), "--split", "all"]
    )
    assert both.exit_code == 2 and "leave out --split" in both.output

    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": ["a"]}))
    refused = CliRunner().invoke(app, [*args, "--split-file", str(bad)])
    assert refused.exit_code == 2 and str(bad) in refused.output and "'val'" in refused.output

    unknown = tmp_path / "o" / "split.json"
    unknown.parent.mkdir()
    unknown.write_text(json.dumps({"val": ["nope-1", "nope-2"]}))
    (unknown.parent / "config.json").write_text(json.dumps({"data": {"specs": "layout:x"}}))
    refused = CliRunner().invoke(app, [*args, "--split-file", str(unknown)])
    assert refused.exit_code == 2 and "data.specs is not a list" in refused.output
    (unknown.parent / "config.json").unlink()
    refused = CliRunner().invoke(
        app, [*args, "--split-file", str(unknown), "--data", f"layout:{other_data}"]
    )
    assert refused.exit_code == 2 and "2 validation case(s) are not in the data" in refused.output


def test_eval_without_checkpoint_is_a_one_line_error() -> None:
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2 and "--checkpoint" in result.output


def test_ablation_trains_three_variants_and_prints_table1(tmp_path: Path) -> None:
    data = write_tiny_layout(tmp_path / "data", 6, seed=2)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML, encoding="utf-8")
    out = tmp_path / "ablation"
    result = CliRunner().invoke(
        app,
        [
            "ablation",
            "--data",
            f"layout:{data}",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--config",
            str(config),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| | DenseNet | DenseNet-A | RADnet |" in result.output
    for row in ("| Accuracy |", "| Recall |", "| Precision |", "| F1 score |"):
        assert row in result.output
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["variants"]) == {"densenet", "densenet_a", "radnet"}
    splits = {v: json.loads((out / v / "split.json").read_text()) for v in report["variants"]}
    assert splits["densenet"] == splits["radnet"] == splits["densenet_a"]  # one split for all
    for variant in report["variants"]:
        assert (out / variant / "eval" / "roc.png").is_file()
    assert (
        load_for_evaluation(out / "densenet" / "checkpoints" / "best.pt").model.config.variant
        == "densenet"
    )
