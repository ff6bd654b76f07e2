"""``radnet-node infer`` end to end: real files in, validated DICOM and result.json out, one line
per series or skipped file, exit codes, and no half-written output folder."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from fixed_weights import write_fixed_weights
from node_process import node_command
from pacs import dciodvfy_errors
from pydicom import uid
from pydicom.encaps import encapsulate
from typer.testing import CliRunner

from radnet_node.cli import EXIT_FAILED, EXIT_NOTHING_TO_DO, EXIT_OK, EXIT_USAGE, app
from radnet_node.errors import InputError
from radnet_node.infer import write_series_folder
from training.dicom_writer import SeriesGeometry, StudyInfo

PHILIPS = "dcm_qa_ct/Philips_Ingenuity_head_phantom"
SPACING = (3.2, 3.2)
GEOMETRY = SeriesGeometry(
    rows=80, columns=80, pixel_spacing_mm=SPACING, table_positions_mm=(0, 5, 10, 15, 20, 25)
)
RESULT_KEYS = {
    "study_instance_uid",
    "series_instance_uid",
    "ct_positive",
    "certainty",
    "threshold",
    "slices",
    "hemorrhage_volume_ml",
    "model",
    "timings_ms",
    "outputs",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny weights whose every slice scores 0.993 (fixed classifier), aux heads random."""
    folder = tmp_path_factory.mktemp("weights")
    return write_fixed_weights(folder / "tiny.pt", field_of_view_mm=256.0, name="radnet-tiny-test")


@pytest.fixture
def generated(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> list[Path]:
    hu = head_hu((6, 80, 80), SPACING, radii_mm=(100.0, 85.0))
    hu[2:5, 30:45, 30:40] = 70.0
    return write_series(hu, GEOMETRY, "generated")


def _invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_generated_series_and_philips_study_end_to_end(
    tmp_path: Path, dicom_data_dir: Path, weights: Path, generated: list[Path]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = _invoke(
        "infer", generated[0].parent, dicom_data_dir / PHILIPS, "--out", out, "--weights", weights,
        "--device", "cpu",
    )  # fmt: skip
    assert code == EXIT_OK, stdout
    philips = {
        folder: str(pydicom.dcmread(next((dicom_data_dir / PHILIPS / folder).glob("I*")))[
            "SeriesInstanceUID"
        ].value)
        for folder in ("S21570/S2010", "S21610/S2010")
    }  # fmt: skip
    expected = {pydicom.dcmread(generated[0]).SeriesInstanceUID, *philips.values()}
    assert {p.name for p in out.iterdir()} == expected
    # one line per series done, and per skipped series or file with its reason
    assert stdout.count("done    ") == 3
    assert "a localizer (scout) image" in stdout
    assert "a secondary capture" in stdout
    assert stdout.count("DIRFILE: a DICOMDIR") == 4

    for series_uid in expected:
        folder = out / series_uid
        document = json.loads((folder / "result.json").read_text())
        assert RESULT_KEYS <= set(document)
        assert document["series_instance_uid"] == series_uid
        assert document["ct_positive"] is True  # every slice scores 0.993
        assert 0.0 <= document["certainty"] <= 1.0
        assert document["model"]["sha256"] and document["model"]["name"] == "radnet-tiny-test"
        assert {"read_decode", "preprocess", "model", "postprocess", "write"} <= set(
            document["timings_ms"]
        )
        slices = document["slices"]
        assert all(s["positive"] and s["probability"] == pytest.approx(0.9933, abs=1e-3)
                   for s in slices)  # fmt: skip
        assert len({s["sop_instance_uid"] for s in slices}) == len(slices)
        assert set(document["outputs"]) == {"sr", "seg", "key_image", "preview", "result"}
        for name in document["outputs"].values():
            assert (folder / name).is_file()
        for name in ("sr.dcm", "seg.dcm", "key-image.dcm"):
            assert dciodvfy_errors(folder / name) == [], (series_uid, name)
        seg = pydicom.dcmread(folder / "seg.dcm")
        assert seg.StudyInstanceUID == document["study_instance_uid"]
    # the tilted 2.5 mm Philips series: 54 slices in source (normal) order
    tilted = json.loads((out / philips["S21610/S2010"] / "result.json").read_text())
    assert len(tilted["slices"]) == 54
    assert [s["index"] for s in tilted["slices"]] == list(range(54))
    assert _leftovers(out) == []


def test_negative_result_via_config_threshold_has_no_key_image(
    tmp_path: Path, weights: Path, generated: list[Path]
) -> None:
    config = tmp_path / "radnet_node.toml"
    config.write_text(
        f'[model]\nweights = "{weights}"\ndevice = "cpu"\nthreshold = 0.999\n'
        "[series]\nmin_slices = 6\n"
    )
    out = tmp_path / "out"
    code, stdout, _ = _invoke("infer", *generated, "--out", out, "--config", config)
    assert code == EXIT_OK, stdout
    assert "hemorrhage absent" in stdout
    (folder,) = out.iterdir()
    document = json.loads((folder / "result.json").read_text())
    assert document["ct_positive"] is False
    assert document["threshold"] == 0.999
    assert document["hemorrhage_volume_ml"] == 0.0
    assert not any(s["positive"] for s in document["slices"])
    assert sorted(p.name for p in folder.iterdir()) == [
        "preview.png", "result.json", "seg.dcm", "sr.dcm",
    ]  # fmt: skip
    assert dciodvfy_errors(folder / "sr.dcm") == []


def test_a_failed_series_gives_exit_1_and_the_others_are_still_written(
    tmp_path: Path,
    weights: Path,
    generated: list[Path],
    head_hu: Callable[..., np.ndarray],
    write_series: Callable[..., list[Path]],
) -> None:
    other = write_series(
        head_hu((6, 80, 80), SPACING), GEOMETRY, "other", study=StudyInfo(uid_seed="other")
    )
    # one slice of the second series in a compressed syntax no installed decoder handles
    ds = pydicom.dcmread(other[2])
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = encapsulate([bytes(128)])
    ds["PixelData"].VR = "OB"
    ds.save_as(other[2], enforce_file_format=True)
    # and a truncated file beside them
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(generated[0].read_bytes()[:400])

    out = tmp_path / "out"
    code, stdout, stderr = _invoke(
        "infer", generated[0].parent, other[0].parent, truncated, "--out", out,
        "--weights", weights,
    )  # fmt: skip
    assert code == EXIT_FAILED
    assert f'FAILED  #2 "HEAD 5MM (SYNTHETIC)" {ds.SeriesInstanceUID}' in stdout
    failed_line = next(line for line in stdout.splitlines() if line.startswith("FAILED"))
    assert str(other[2]) in failed_line and "MPEG2" in failed_line
    assert f"ERROR   {truncated}: corrupt DICOM file" in stdout
    assert "1 eligible series failed and 1 DICOM file(s) could not be read" in stderr
    assert {p.name for p in out.iterdir()} == {pydicom.dcmread(generated[0]).SeriesInstanceUID}


def test_summary_names_only_the_problems_there_were(
    tmp_path: Path, generated: list[Path], weights: Path
) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(generated[0].read_bytes()[:400])
    code, _, stderr = _invoke(
        "infer", generated[0].parent, truncated, "--out", tmp_path / "out", "--weights", weights
    )
    assert code == EXIT_FAILED
    assert "radnet-node: error: 1 DICOM file(s) could not be read (see" in stderr
    assert "series failed" not in stderr


def test_no_eligible_series_gives_exit_3(
    tmp_path: Path, dicom_data_dir: Path, weights: Path
) -> None:
    single = dicom_data_dir / "pydicom-testfiles" / "693_UNCR.dcm"
    code, stdout, stderr = _invoke("infer", single, "--out", tmp_path / "o", "--weights", weights)
    assert code == EXIT_NOTHING_TO_DO
    assert "too few slices: 1, at least 5 required" in stdout
    assert "no eligible axial head-CT series" in stderr


def test_bad_config_weights_and_paths_give_one_line_and_exit_2(
    tmp_path: Path, weights: Path, generated: list[Path]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nthreshhold = 0.4\n")
    cases = [
        (["--config", config], "model.threshhold: unknown key"),
        (["--weights", tmp_path / "missing.pt"], "missing.pt: weights file not found"),
        (["--weights", weights, "--device", "tpu"], "--device"),
    ]
    for extra, message in cases:
        code, _, stderr = _invoke("infer", generated[0], "--out", tmp_path / "o", *extra)
        assert code == EXIT_USAGE, (extra, stderr)
        assert message in stderr
        assert len(stderr.strip().splitlines()) == 1
        assert "Traceback" not in stderr
    code, _, stderr = _invoke("infer", tmp_path / "nowhere", "--out", tmp_path / "o", "--weights",
                              weights)  # fmt: skip
    assert code == EXIT_USAGE
    assert "nowhere: no such file or folder" in stderr


def test_a_rerun_replaces_the_series_folder_whole(
    tmp_path: Path, weights: Path, generated: list[Path]
) -> None:
    out = tmp_path / "out"
    assert _invoke("infer", *generated, "--out", out, "--weights", weights)[0] == EXIT_OK
    (folder,) = out.iterdir()
    (folder / "stale.txt").write_text("from an older run")
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nweights = "{weights}"\nthreshold = 0.999\n')
    assert _invoke("infer", *generated, "--out", out, "--config", config)[0] == EXIT_OK
    assert [p.name for p in out.iterdir()] == [folder.name]
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / "result.json").read_text())["threshold"] == 0.999
    assert not (folder / "key-image.dcm").exists()


def test_a_failed_write_leaves_no_folder_and_keeps_the_previous_one(tmp_path: Path) -> None:
    write_series_folder(tmp_path, "1.2.3", {"result.json": b"old"})
    with pytest.raises(InputError, match="cannot write the outputs"):
        write_series_folder(tmp_path, "1.2.3", {"result.json": b"new", "sub/dir.png": b"x"})
    with pytest.raises(InputError, match="cannot write the outputs"):
        write_series_folder(tmp_path, "4.5.6", {"sub/dir.png": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.2.3"]
    assert (tmp_path / "1.2.3" / "result.json").read_bytes() == b"old"


def test_console_script_runs(tmp_path: Path, weights: Path, generated: list[Path]) -> None:
    run = subprocess.run(
        [*node_command(), "infer", str(generated[0].parent), "--out", str(tmp_path / "o"),
         "--weights", str(weights), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == EXIT_OK, run.stderr
    assert "1 series done, 0 failed" in run.stdout


def test_library_warnings_are_one_line_without_the_library_s_path(
    tmp_path: Path, generated: list[Path], weights: Path
) -> None:
    for path in generated:  # an accession number longer than SH allows, as some RIS write them
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "ACC-2026-000000012345"
        ds.save_as(path, enforce_file_format=True)
    code, _, stderr = _invoke(
        "infer", generated[0].parent, "--out", tmp_path / "out", "--weights", weights
    )
    assert code == EXIT_OK
    assert "warning: The value length (21) exceeds the maximum length of 16 allowed for VR SH" in (
        stderr
    )
    assert "site-packages" not in stderr and "warn_and_log" not in stderr
