"""Configuration: TOML with every key documented in ``default.toml``, overridable by a file and by
``CXR_TRIAGE_<SECTION>_<KEY>`` environment variables.

Unknown sections or keys are errors, so a typo in a hospital's config fails at start-up, not silently.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "default.toml"
ENV_PREFIX = "CXR_TRIAGE_"


class ConfigError(ValueError):
    """The configuration names an unknown key or holds a value of the wrong type."""


def _defaults() -> dict[str, dict[str, Any]]:
    with DEFAULT_CONFIG.open("rb") as fh:
        return tomllib.load(fh)


AUTO_COUNTS = frozenset({("worker", "processes"), ("worker", "threads")})
"""Keys that take a whole number or the string "auto"."""


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    if (section, key) in AUTO_COUNTS:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f'[{section}] {key} = {value!r}: expected "auto" or a whole number')
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"[{section}] {key} = {value!r}: expected {type(default).__name__}")
    return value


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def merge(base: dict[str, dict[str, Any]], override: Mapping[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    merged = copy.deepcopy(base)
    for section, values in override.items():
        if section not in merged:
            raise ConfigError(f"{origin}: unknown section [{section}]; known: {', '.join(sorted(merged))}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            if key not in merged[section]:
                raise ConfigError(f"{origin}: unknown key [{section}] {key}")
            merged[section][key] = _coerce(section, key, base[section][key], value)
    return merged


def env_overrides(environ: Mapping[str, str], sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``CXR_TRIAGE_LISTENER_PORT=104`` -> ``{"listener": {"port": 104}}``; unknown names are errors."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in sorted(sections, key=len, reverse=True) if rest.startswith(s + "_")), None)
        key = rest[len(section) + 1 :] if section else ""
        if section is None or key not in sections[section]:
            raise ConfigError(f"environment variable {name} names no configuration key")
        default = sections[section][key]
        text = isinstance(default, str) and (section, key) not in AUTO_COUNTS
        out.setdefault(section, {})[key] = raw if text else _parse_env_value(raw)
    return out


@dataclass(frozen=True)
class Config:
    """The effective configuration as plain tables; ``cxr_triage.core.settings`` turns it into typed sections."""

    values: Mapping[str, Mapping[str, Any]]
    source: Path | None = None

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self.values[name]


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file at ``path`` (if any), then the environment."""
    values = _defaults()
    source = None
    if path:
        source = Path(path)
        try:
            with source.open("rb") as fh:
                user = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {source}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
        values = merge(values, user, str(source))
    env = os.environ if environ is None else environ
    values = merge(values, env_overrides(env, values), "environment")
    return Config(values=values, source=source)
