"""``[dicomweb]`` as values: the DICOMweb servers the SRs are sent to by STOW-RS (out), and this node's own STOW-RS
endpoint (in), each checked at construction.

Secrets never stand in the configuration file itself: a bearer token or a basic-auth password is named by an
environment variable (``*_env``) or a file (``*_file``, e.g. a systemd credential or a Kubernetes secret), and
read by ``Secret.read`` when it is used, so a rotated secret is picked up without a restart; ``Secret.check``
(a start-up check) says when it cannot be read. Nothing here opens a connection; ``settings`` parses the section
into ``DicomwebSettings``, ``cxr_triage.outputs.dicomweb`` sends and ``cxr_triage.dicom.stow`` receives.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from cxr_triage.core.config import ConfigError

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class Secret:
    """A secret read from an environment variable or a file (never the configuration); empty: none."""

    env: str = ""
    file: str = ""

    def __post_init__(self) -> None:
        if self.env and self.file:
            raise ValueError("give a secret's environment variable or its file, not both")

    def __bool__(self) -> bool:
        return bool(self.env or self.file)

    def where(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def read(self) -> str:
        """The secret (one line: surrounding white space removed); ValueError naming where when it is unset."""
        if self.env:
            value = os.environ.get(self.env, "").strip()
        elif self.file:
            try:
                value = Path(self.file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read the secret's file {self.file}: {exc.strerror}") from exc
        else:
            return ""
        if not value:
            raise ValueError(f"the secret's {self.where()} is empty or unset")
        return value


@dataclass(frozen=True)
class DicomwebServer:
    """A STOW-RS destination: its name (how rows name it), the base URL of its DICOMweb API (``.../dicom-web``)
    and its authentication: a bearer token, or basic authentication with a user name and a password."""

    name: str
    url: str
    token: Secret = field(default_factory=Secret)
    username: str = ""
    password: Secret = field(default_factory=Secret)

    def __post_init__(self) -> None:
        if not self.name or not set(self.name) <= _NAME_CHARS or len(self.name) > 64:
            raise ValueError(f"name = {self.name!r}: 1 to 64 letters, digits, '.', '_' or '-'")
        url = self.url.strip().rstrip("/") if isinstance(self.url, str) else ""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError(f"url = {self.url!r}: expected http(s)://host:port/path of a DICOMweb API")
        object.__setattr__(self, "url", url)
        if self.token and (self.username or self.password):
            raise ValueError("a bearer token or basic authentication (username + password), not both")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password_env / password_file go together (basic authentication)")

    @classmethod
    def from_mapping(cls, entry: Any) -> Self:
        """A ``[dicomweb] destinations`` entry ``{ name, url }`` (+ ``token_env`` / ``token_file``, or
        ``username`` with ``password_env`` / ``password_file``)."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"a destination must be a table {{ name, url }}, got {entry!r}")
        known = {"name", "url", "token_env", "token_file", "username", "password_env", "password_file"}
        missing, unknown = sorted({"name", "url"} - set(entry)), sorted(set(entry) - known)
        if missing or unknown:
            raise ValueError(f"missing keys {missing}, unknown keys {unknown}")
        if not all(isinstance(v, str) for v in entry.values()):
            raise ValueError("every value of a destination is a string")
        return cls(
            name=entry["name"],
            url=entry["url"],
            token=Secret(entry.get("token_env", ""), entry.get("token_file", "")),
            username=entry.get("username", ""),
            password=Secret(entry.get("password_env", ""), entry.get("password_file", "")),
        )


@dataclass(frozen=True)
class DicomwebSettings:
    """``[dicomweb]``: STOW-RS out (``destinations``, with ``[forward]``-like retries) and the STOW-RS endpoint
    that ``serve`` runs when ``stow_enabled``."""

    destinations: tuple[DicomwebServer, ...] = ()
    tls_ca_file: str = ""
    timeout: float = 30.0
    max_attempts: int = 5
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    stow_enabled: bool = False
    stow_host: str = "127.0.0.1"
    stow_port: int = 8081
    stow_allowed_networks: tuple[str, ...] = ()
    stow_token: Secret = field(default_factory=Secret)
    stow_tls_certificate: str = ""
    stow_tls_private_key: str = ""
    stow_tls_ca_file: str = ""
    stow_max_request_mb: float = 512.0
    stow_max_instance_mb: float = 256.0

    def __post_init__(self) -> None:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations: names must differ, got {names}")
        if self.max_attempts < 1 or self.timeout <= 0 or self.backoff_seconds < 0 or self.backoff_max_seconds < 0:
            raise ValueError("max_attempts must be >= 1, timeout > 0, backoff_seconds and backoff_max_seconds >= 0")
        if not 0 <= self.stow_port <= 65535:
            raise ValueError(f"stow_port = {self.stow_port}: must be within 0-65535 (0: any free port)")
        for network in self.stow_allowed_networks:
            ipaddress.ip_network(network, strict=False)
        if bool(self.stow_tls_certificate) != bool(self.stow_tls_private_key):
            raise ValueError("stow_tls_certificate and stow_tls_private_key go together")
        if self.stow_tls_ca_file and not self.stow_tls_certificate:
            raise ValueError("stow_tls_ca_file (client certificates) needs stow_tls_certificate (TLS)")
        if self.stow_max_request_mb <= 0 or self.stow_max_instance_mb <= 0:
            raise ValueError("stow_max_request_mb and stow_max_instance_mb must be > 0")
        if self.stow_enabled and not (self.stow_token or self.stow_tls_ca_file):
            raise ValueError(
                "stow_enabled needs an allow-list: stow_token_env / stow_token_file (a bearer token) and/or "
                "stow_tls_ca_file (client certificates)"
            )

    @classmethod
    def from_config(cls, table: Mapping[str, Any]) -> Self:
        """``from_table`` for ``Settings``: a bad value is a ``ConfigError`` naming ``[dicomweb]``."""
        try:
            return cls.from_table(table)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[dicomweb] {exc}") from exc

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Self:
        values = dict(table)
        destinations = []
        for index, entry in enumerate(values.pop("destinations", ())):
            try:
                destinations.append(DicomwebServer.from_mapping(entry))
            except ValueError as exc:
                raise ValueError(f"destinations[{index}]: {exc}") from exc
        token = Secret(values.pop("stow_token_env", ""), values.pop("stow_token_file", ""))
        networks = tuple(values.pop("stow_allowed_networks", ()))
        return cls(destinations=tuple(destinations), stow_token=token, stow_allowed_networks=networks, **values)

    def destination(self, name: str) -> DicomwebServer | None:
        return next((d for d in self.destinations if d.name == name), None)

    @property
    def stow_tls(self) -> bool:
        return bool(self.stow_tls_certificate)
