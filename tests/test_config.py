"""Configuration: documented defaults, file and environment overrides, typed values, loud errors."""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cxr_triage.core.config import DEFAULT_CONFIG, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def defaults() -> dict[str, dict[str, Any]]:
    with DEFAULT_CONFIG.open("rb") as fh:
        return tomllib.load(fh)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_defaults_load_without_file_or_environment() -> None:
    config = load_config(None, environ={})
    assert config.values == defaults()
    assert config.source is None
    for section in ("listener", "storage", "database", "model", "worker", "triage", "sr", "forward", "logging"):
        assert config[section] == defaults()[section]


def test_config_default_toml_is_the_packaged_default() -> None:
    link = REPO / "config" / "default.toml"
    assert link.is_symlink()
    assert link.resolve() == DEFAULT_CONFIG == (REPO / "cxr_triage" / "default.toml").resolve()
    assert importlib.resources.files("cxr_triage").joinpath("default.toml").is_file()
    with (REPO / "pyproject.toml").open("rb") as fh:
        package_data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["cxr_triage"]
    assert "default.toml" in package_data


def test_every_default_key_is_documented() -> None:
    """Each key carries a comment on its line or on the line(s) just above it."""
    documented: set[tuple[str, str]] = set()
    section, comment_above = "", False
    for raw in DEFAULT_CONFIG.read_text().splitlines():
        line = raw.strip()
        if header := re.fullmatch(r"\[([A-Za-z0-9_]+)\]\s*(#.*)?", line):
            section, comment_above = header.group(1), False
        elif key := re.match(r"([A-Za-z0-9_]+)\s*=(.*)", line):
            if comment_above or "#" in key.group(2):
                documented.add((section, key.group(1)))
            comment_above = False
        else:
            comment_above = line.startswith("#")
    missing = [f"[{s}] {k}" for s, values in defaults().items() for k in values if (s, k) not in documented]
    assert missing == []


def test_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = write(tmp_path, '[listener]\nport = 104\nae_title = "TRIAGE_TEST"\n\n[triage]\ncovid_threshold = 0.7\n')
    config = load_config(path, environ={})
    assert config.source == path
    assert config["listener"]["port"] == 104 and config["listener"]["ae_title"] == "TRIAGE_TEST"
    assert config["triage"]["covid_threshold"] == 0.7
    expected = defaults()
    expected["listener"].update(port=104, ae_title="TRIAGE_TEST")
    expected["triage"]["covid_threshold"] = 0.7
    assert config.values == expected


def test_integer_is_accepted_for_a_float_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[triage]\ncovid_threshold = 1\n"), environ={})
    value = config["triage"]["covid_threshold"]
    assert value == 1.0 and isinstance(value, float)


def test_environment_overrides_with_typed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[listener]\nport = 104\n")
    environ = {
        "CXR_TRIAGE_LISTENER_PORT": "2104",  # beats the file
        "CXR_TRIAGE_LISTENER_TLS_ENABLED": "true",
        "CXR_TRIAGE_LISTENER_ALLOWED_CALLING_AES": '["PACS", "MODALITY1"]',
        "CXR_TRIAGE_LISTENER_AE_TITLE": "104",  # a string key keeps the text, even when it looks like a number
        "CXR_TRIAGE_TRIAGE_PNEUMONIA_THRESHOLD": "0.01",
        "CXR_TRIAGE_SR_SERIES_DESCRIPTION": "triage # with a hash",
        "CXR_TRIAGE_MODEL_DEVICE": "cpu",
        "HOME": "/root",  # not ours: ignored
    }
    config = load_config(path, environ=environ)
    listener = config["listener"]
    assert listener["port"] == 2104 and isinstance(listener["port"], int)
    assert listener["tls_enabled"] is True
    assert listener["allowed_calling_aes"] == ["PACS", "MODALITY1"]
    assert listener["ae_title"] == "104"
    assert config["triage"]["pneumonia_threshold"] == 0.01
    assert config["sr"]["series_description"] == "triage # with a hash"
    assert config["model"]["device"] == "cpu"


def test_process_environment_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_TRIAGE_WORKER_MAX_ATTEMPTS", "7")
    assert load_config()["worker"]["max_attempts"] == 7


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[listner]\nport = 104\n", "listner"),
        ("[listener]\nprot = 104\n", "prot"),
        ('[listener]\nport = "104"\n', "port"),
        ("[listener]\nport = true\n", "port"),
        ("[sr]\nenabled = 1\n", "enabled"),
        ('[listener]\nallowed_calling_aes = "PACS"\n', "allowed_calling_aes"),
        ("listener = 3\n", "listener"),
        ("[listener\nport = 104\n", "invalid TOML"),
    ],
    ids=[
        "unknown-section",
        "unknown-key",
        "string-for-int",
        "bool-for-int",
        "int-for-bool",
        "str-for-list",
        "not-a-table",
        "bad-toml",
    ],
)
def test_bad_file_is_an_error_naming_the_problem(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CXR_TRIAGE_LISTENER_PROT", "104"),
        ("CXR_TRIAGE_NOSUCH_KEY", "1"),
        ("CXR_TRIAGE_LISTENER_PORT", "many"),
        ("CXR_TRIAGE_LISTENER_TLS_ENABLED", "yes"),
        ("CXR_TRIAGE_WORKER_POLL_INTERVAL", "fast"),
    ],
)
def test_bad_environment_is_an_error(name: str, value: str) -> None:
    with pytest.raises(ConfigError):
        load_config(None, environ={name: value})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(("text", "expected"), [("2", 2), ('"auto"', "auto"), ("0", 0)])
def test_worker_counts_take_a_number_or_auto(tmp_path: Path, text: str, expected: object) -> None:
    config = load_config(write(tmp_path, f"[worker]\nprocesses = {text}\nthreads = {text}\n"), environ={})
    assert config["worker"]["processes"] == expected
    env = load_config(None, environ={"CXR_TRIAGE_WORKER_PROCESSES": text.strip('"')})
    assert env["worker"]["processes"] == expected


@pytest.mark.parametrize("text", ['"many"', "true", "1.5"])
def test_worker_counts_refuse_anything_else(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match='expected "auto" or a whole number'):
        load_config(write(tmp_path, f"[worker]\nprocesses = {text}\n"), environ={})
