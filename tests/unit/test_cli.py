"""The ``radnet-node`` read commands as processes whose stdout is a pipe the reader closed
(``radnet-node audit show ... | head``): they end quietly with exit code 141, as Unix tools do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from node_support import instance_info, write_series

from radnet_node.audit import AuditDB, study_story
from radnet_node.catalog import register_instance
from radnet_node.cli import EXIT_BROKEN_PIPE, EXIT_OK, EXIT_USAGE
from training.dicom_writer import StudyInfo

ACCESSION = "ACCPIPE"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose audit database holds one study of 6 instances (and their events)."""
    folder = tmp_path_factory.mktemp("cli")
    data_dir = folder / "var"
    db = AuditDB(f"sqlite:///{data_dir / 'audit.sqlite'}")
    try:
        with db.session() as session:
            for path in write_series(folder, "PIPE"):
                register_instance(session, instance_info(path))
    finally:
        db.dispose()
    path = folder / "radnet_node.toml"
    path.write_text(f'[node]\ndata_dir = "{data_dir}"\n', encoding="utf-8")
    return path


COMMANDS = [
    pytest.param(["audit", "show", ACCESSION], id="audit-show"),
    pytest.param(["audit", "tail", "-n", "100"], id="audit-tail"),
    pytest.param(["status", "--no-echo"], id="status"),
]


def _command(args: list[str], config: Path) -> list[str]:
    return [sys.executable, "-m", "radnet_node.cli", *args, "--config", str(config)]


@pytest.mark.parametrize("args", COMMANDS)
def test_a_closed_stdout_pipe_ends_the_command_quietly(args: list[str], config: Path) -> None:
    # the command prints something when someone reads it ...
    read = subprocess.run(
        _command(args, config), capture_output=True, text=True, timeout=120, check=False
    )
    assert read.returncode == EXIT_OK, read.stderr
    assert read.stdout.strip()
    # ... and when the reader is gone before the first line (head -0, or head after its lines)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        gone = subprocess.run(
            _command(args, config), stdout=writer, stderr=subprocess.PIPE, text=True,
            timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert (gone.returncode, gone.stderr) == (EXIT_BROKEN_PIPE, "")


def test_audit_show_refuses_an_empty_query_rather_than_matching_studies_without_accession(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "var"
    db = AuditDB(f"sqlite:///{data_dir / 'audit.sqlite'}")
    try:
        with db.session() as session:
            study = StudyInfo(uid_seed="radnet-node-test-anon", accession_number="")
            for path in write_series(tmp_path, "ANON", study=study):
                register_instance(session, instance_info(path))
        with db.session() as session:
            assert study_story(session, "  ") is None
    finally:
        db.dispose()
    config = tmp_path / "radnet_node.toml"
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n', encoding="utf-8")
    done = subprocess.run(_command(["audit", "show", ""], config), capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == EXIT_USAGE
    assert "UID_OR_ACCESSION is empty" in done.stderr and done.stdout == ""
