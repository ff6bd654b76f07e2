"""The files of ``deploy/`` are valid and agree with each other and with the node: the systemd unit
passes ``systemd-analyze verify``, the example node config loads, the compose file and the Orthanc
config parse and point at files that exist, the Lua script compiles, and the Containerfile copies
only what exists. (Docker cannot run here; the Orthanc config and Lua script are also run for real
in ``test_orthanc_node.py``.)"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from node_process import node_command
from pacs import missing_tool, need_program

from radnet_node.config import load_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "radnet-node.service"
NODE_CONFIG = DEPLOY / "radnet_node.toml"
CONFIG_IN_DEPLOYMENT = "/etc/radnet-node/radnet_node.toml"
DOCKERFILE_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need_program("systemd-analyze")
    node = node_command()[0]
    # verify checks that ExecStart exists: point it at this checkout's console script.
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/opt/radnet-node/bin/radnet-node", str(node)),
        encoding="utf-8",
    )
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          check=False, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_systemd_unit_runs_serve_as_a_dedicated_user_and_stops_with_sigterm() -> None:
    service = _unit()["Service"]
    settings = load_settings(NODE_CONFIG)

    assert service["ExecStart"].endswith(f"radnet-node serve --config {CONFIG_IN_DEPLOYMENT}")
    assert service["User"] not in ("", "root")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    # systemd must wait longer than the node's own grace period before SIGKILL
    assert float(service["TimeoutStopSec"]) > settings.node.shutdown_grace_seconds
    assert Path(service["StateDirectory"]).name == settings.node.data_dir.name


def test_example_node_config_is_valid_and_sends_results_to_the_compose_orthanc() -> None:
    settings = load_settings(NODE_CONFIG)
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    radnet = orthanc["DicomModalities"]["radnet"]

    assert [d.host for d in settings.destinations] == ["orthanc"]
    pacs = settings.destinations[0]
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    assert (radnet["AET"], radnet["Port"]) == (settings.node.ae_title, settings.node.port)
    assert orthanc["DicomAet"] in settings.node.allowed_calling_ae_titles


def test_compose_file_mounts_existing_files_where_the_configs_expect_them() -> None:
    try:
        import yaml  # noqa: PLC0415 - optional test dependency
    except ImportError:
        missing_tool("PyYAML is not installed (pip install pyyaml)")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    orthanc_config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    services = compose["services"]

    assert set(services) == {"orthanc", "radnet-node"}
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), source
                mounts[target] = source
    for script in orthanc_config["LuaScripts"]:
        assert script in mounts, f"{script} is not mounted into the Orthanc container"
    assert CONFIG_IN_DEPLOYMENT in mounts
    node = services["radnet-node"]
    assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).is_file()
    assert node["stop_signal"] == "SIGTERM"


def test_autoroute_lua_compiles() -> None:
    luac = shutil.which("luac5.3") or shutil.which("luac")
    if luac is None:
        missing_tool("luac is not installed (Debian package lua5.3)")
    done = subprocess.run([str(luac), "-p", str(DEPLOY / "orthanc" / "radnet-autoroute.lua")],
                          capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_containerfile_uses_known_instructions_and_copies_what_exists() -> None:
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    instructions = [line.split(maxsplit=1) for line in logical.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip

    assert {i[0] for i in instructions} <= DOCKERFILE_INSTRUCTIONS
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    copies = [i[1].split() for i in instructions if i[0] == "COPY"]
    for *sources, _target in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    runs = " ".join(i[1] for i in instructions if i[0] == "RUN")
    assert runs.index("torch==2.13.0") < runs.index("pip install .")
    assert json.loads(dict(instructions)["CMD"]) == [
        "radnet-node", "serve", "--config", CONFIG_IN_DEPLOYMENT,
    ]  # fmt: skip
