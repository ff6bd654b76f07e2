"""Configuration: the repo's file runs as is, relative paths follow the file, and every bad key or
value stops with a message naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from radnet_node.config import (
    CONFIG_ENV,
    AuditSection,
    DestinationSection,
    LoggingSection,
    ModelSection,
    NodeSection,
    SeriesSection,
    Settings,
    TlsSection,
    load_settings,
    resolve_config_path,
)
from radnet_node.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parents[2] / "radnet_node.toml"


def test_repo_config_is_valid_and_puts_the_data_next_to_it(tmp_path: Path) -> None:
    settings = load_settings(REPO_CONFIG)
    assert settings.node.ae_title == "RADNET"
    assert settings.node.port == 11112
    assert settings.node.data_dir == REPO_CONFIG.parent / "var"
    assert settings.series.quiet_seconds == 10.0
    assert settings.destinations == ()
    assert settings.database_url == f"sqlite:///{REPO_CONFIG.parent / 'var' / 'audit.sqlite'}"
    assert settings.logging.log_patient_names is False
    extent = tmp_path / "extent.toml"
    extent.write_text("[model]\nmin_positive_extent_mm = 14.0\n")
    assert load_settings(extent).engine_settings().min_positive_extent_mm == 14.0


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "node.toml"
    config.write_text(
        '[node]\ndata_dir = "data"\n'
        '[node.tls]\ncertificate = "tls/a.crt"\nprivate_key = "tls/a.key"\n'
        '[model]\nweights = "w/tiny.pt"\n'
        '[audit]\ndatabase_url = "sqlite:///db/audit.sqlite"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        'tls = { ca_certificates = "tls/ca.crt" }\n'
    )
    settings = load_settings(config)
    assert settings.node.data_dir == folder / "data"
    assert settings.node.tls is not None and settings.node.tls.certificate == folder / "tls/a.crt"
    assert settings.model.weights == str(folder / "w/tiny.pt")
    assert settings.engine_settings().min_positive_extent_mm is None
    assert settings.database_url == f"sqlite:///{folder / 'db/audit.sqlite'}"
    tls = settings.destinations[0].tls
    assert tls is not None and tls.ca_certificates == folder / "tls/ca.crt"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nportt = 1\n", "node.portt: unknown key"),
        ("[node]\nport = 70000\n", "node.port:"),
        ('[node]\nae_title = "A_VERY_LONG_AE_TITLE"\n', "longer than 16 characters"),
        ('[node]\nae_title = "   "\n', "must not be empty"),
        ('[node]\nallowed_hosts = ["hospital.example"]\n', "not an IP address or network"),
        ("[series]\nquiet_seconds = 0\n", "series.quiet_seconds:"),
        ('[logging]\nformat = "xml"\n', "logging.format:"),
        ('[node.tls]\ncertificate = "a"\nprivate_key = "b"\nrequire_client_certificate = true\n',
         "needs ca_certificates"),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
         '[[destinations]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 2\n', "used twice"),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\n', "destinations.0.port:"),
        ('[[destinations]]\nname = "a b"\nae_title = "A"\nhost = "h"\nport = 1\n',
         "destinations.0.name:"),
        ('[audit]\ndatabase_url = "not a url"\n', "audit.database_url"),
        ("[model]\nmin_positive_extent_mm = -1\n", "model.min_positive_extent_mm:"),
        # a misspelt key: the misspelling first, then the key it leaves missing
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nprot = 1\n',
         "destinations.0.prot: unknown key; destinations.0.port: Field required"),
    ],
)  # fmt: skip
def test_bad_keys_and_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="bad.toml") as info:
        load_settings(config)
    assert message in str(info.value)


def test_config_file_from_option_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert resolve_config_path(None) is None
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.toml"))
    assert resolve_config_path(None) == tmp_path / "env.toml"
    assert resolve_config_path(tmp_path / "opt.toml") == tmp_path / "opt.toml"


def test_no_file_means_defaults_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None)
    assert settings.node.data_dir == tmp_path / "var"
    assert Settings().node.ae_title == settings.node.ae_title


def test_host_allow_list_takes_addresses_and_networks() -> None:
    node = NodeSection(allowed_hosts=("10.0.0.0/24", "192.168.1.7", "::1"))
    assert node.host_allowed("10.0.0.200")
    assert node.host_allowed("192.168.1.7")
    assert node.host_allowed("::1")
    assert not node.host_allowed("10.0.1.1")
    assert not node.host_allowed("not-an-ip")
    assert NodeSection().host_allowed("203.0.113.9")  # empty list: anyone


def test_backoff_doubles_up_to_the_cap() -> None:
    destination = DestinationSection(
        name="p", ae_title="P", host="h", port=1, backoff_seconds=2.0, max_backoff_seconds=10.0
    )
    assert [destination.backoff(n) for n in (1, 2, 3, 4, 50)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_the_readme_table_names_every_key_of_every_section() -> None:
    """Admins read the README's configuration table: a key added to a section must appear there."""
    readme = (REPO_CONFIG.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration: `radnet_node.toml`", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `[")]
    sections = {
        "node": NodeSection,
        "node.tls": TlsSection,
        "series": SeriesSection,
        "model": ModelSection,
        "[destinations]": DestinationSection,
        "audit": AuditSection,
        "logging": LoggingSection,
    }
    for section, model in sections.items():
        cells = [row.split("|")[1] for row in rows if row.startswith(f"| `[{section}] ")]
        named = {code.split("] ")[-1] for cell in cells for code in re.findall(r"`([^`]+)`", cell)}
        missing = [
            key
            for key in model.model_fields
            if key not in named  # a sub-table such as [node.tls] has rows of its own
            and not any(row.startswith(f"| `[{section}.{key}] ") for row in rows)
        ]
        assert not missing, f"[{section}] keys missing from the README table: {missing}"
