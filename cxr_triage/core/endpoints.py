"""The endpoints that the configuration names, as values checked at construction: a DICOM destination
(``[forward] destinations``), an MLLP receiver and the codes of HL7 messages (``[hl7]``), an Orthanc REST API, a
FHIR server (``[fhir] destinations``: its base URL, where its secrets are read from, its CA bundle).

They stand here, below both ``cxr_triage.core.settings`` (which parses the configuration into them) and the
outputs that use them (``cxr_triage.dicom.scu``, ``cxr_triage.outputs.hl7``, ``cxr_triage.outputs.orthanc``,
``cxr_triage.outputs.fhir``), so
that loading the configuration imports no output. Nothing here opens a connection: ``client_tls_context`` builds
the TLS context that a destination with ``tls`` is reached with.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_AE_TITLE_LENGTH = 16
"""DICOM AE titles are 1 to 16 characters of the default repertoire (PS3.5 6.2, VR AE)."""

HL7_DELIMITERS = "|^~\\&"
MAX_IS_LENGTH = 20
"""HL7 v2.5.1 IS (the namespace of an application or facility, codes of user tables): at most 20 characters."""


def validate_ae_title(value: object, what: str = "AE title") -> str:
    """Return ``value`` without padding spaces if it is a valid AE title, else raise ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    title = value.strip(" ")
    if not 1 <= len(title) <= MAX_AE_TITLE_LENGTH:
        raise ValueError(f"{what} must be 1 to {MAX_AE_TITLE_LENGTH} characters, got {value!r}")
    if "\\" in title or any(not (0x20 <= ord(ch) < 0x7F) for ch in title):
        raise ValueError(f"{what} must not contain backslashes, control or non-ASCII characters: {value!r}")
    return title


@dataclass(frozen=True)
class Destination:
    """A C-STORE destination: the peer's AE title, host and port, and whether it is reached over TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "destination AE title"))
        if not isinstance(self.host, str) or not self.host.strip() or any(ch.isspace() for ch in self.host.strip()):
            raise ValueError(f"destination host must be a non-empty host name or address, got {self.host!r}")
        object.__setattr__(self, "host", self.host.strip())
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"destination port must be an integer within 1-65535, got {self.port!r}")
        if not isinstance(self.tls, bool):
            raise ValueError(f"destination tls must be true or false, got {self.tls!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Destination:
        """Build a destination from a ``[forward] destinations`` entry ``{ae_title, host, port}`` (+ ``tls``)."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"a destination must be a table {{ae_title, host, port}}, got {type(mapping).__name__}")
        required, optional = {"ae_title", "host", "port"}, {"tls"}
        missing = sorted(required - set(mapping))
        unknown = sorted(set(mapping) - required - optional)
        if missing or unknown:
            raise ValueError(f"destination {dict(mapping)!r}: missing keys {missing}, unknown keys {unknown}")
        port = mapping["port"]
        if isinstance(port, str) and port.strip().isdigit():
            port = int(port.strip())
        return cls(
            ae_title=mapping["ae_title"],  # type: ignore[arg-type]
            host=mapping["host"],  # type: ignore[arg-type]
            port=port,  # type: ignore[arg-type]
            tls=mapping.get("tls", False),  # type: ignore[arg-type]
        )

    def __str__(self) -> str:
        """``AE@host:port``: how forwards name their destination (the same with or without TLS)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


def client_tls_context(ca_file: str = "", certificate: str = "", private_key: str = "") -> ssl.SSLContext:
    """The TLS context for destinations with ``tls``: peers verified against ``ca_file`` (PEM; the system's trust
    store when empty) and their host name; ``certificate`` and ``private_key`` (PEM) are presented to peers that
    require client certificates. Unreadable files raise OSError or ssl.SSLError (configuration errors)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate:
        context.load_cert_chain(certfile=certificate, keyfile=private_key or None)
    elif private_key:
        raise ValueError("a TLS private key needs its certificate")
    return context


def check_token(value: object, what: str, max_length: int = MAX_IS_LENGTH, allow_empty: bool = False) -> str:
    """``value`` stripped if it is printable ASCII without HL7 delimiters and at most ``max_length`` long."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    if len(text) > max_length or any(ch in HL7_DELIMITERS or not 0x20 <= ord(ch) < 0x7F for ch in text):
        raise ValueError(
            f"{what} = {value!r}: at most {max_length} printable ASCII characters, none of {HL7_DELIMITERS}"
        )
    return text


@dataclass(frozen=True)
class HL7Code:
    """A coded value (CWE/CE): code, text, coding system; written ``code^text^system`` in the configuration."""

    code: str
    text: str
    system: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", check_token(self.code, "code", 199))
        object.__setattr__(self, "text", check_token(self.text, "text", 199, allow_empty=True))
        object.__setattr__(self, "system", check_token(self.system, "coding system", MAX_IS_LENGTH))

    @classmethod
    def parse(cls, value: object) -> HL7Code:
        """``"code^text^system"`` (e.g. ``"17621005^Normal^SCT"``) as a code."""
        if not isinstance(value, str) or value.count("^") != 2:
            raise ValueError(f"{value!r}: expected code^text^system, e.g. 17621005^Normal^SCT")
        code, text, system = value.split("^")
        return cls(code, text, system)

    def __str__(self) -> str:
        return f"{self.code}^{self.text}^{self.system}"


@dataclass(frozen=True)
class HL7Destination:
    """An MLLP receiver: its application (MSH-5) and facility (MSH-6), host and port."""

    application: str
    host: str
    port: int
    facility: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "application", check_token(self.application, "application"))
        object.__setattr__(self, "facility", check_token(self.facility, "facility", allow_empty=True))
        if not isinstance(self.host, str) or not self.host.strip() or any(ch.isspace() for ch in self.host.strip()):
            raise ValueError(f"host must be a non-empty host name or address, got {self.host!r}")
        object.__setattr__(self, "host", self.host.strip())
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"port must be an integer within 1-65535, got {self.port!r}")

    @classmethod
    def from_mapping(cls, mapping: object) -> HL7Destination:
        """An ``[hl7] destinations`` entry ``{ application, host, port }`` (+ ``facility``)."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"a destination must be a table {{application, host, port}}, got {mapping!r}")
        required, optional = {"application", "host", "port"}, {"facility"}
        missing, unknown = sorted(required - set(mapping)), sorted(set(mapping) - required - optional)
        if missing or unknown:
            raise ValueError(f"destination {dict(mapping)!r}: missing keys {missing}, unknown keys {unknown}")
        return cls(mapping["application"], mapping["host"], mapping["port"], mapping.get("facility", ""))

    @classmethod
    def parse(cls, text: str) -> HL7Destination:
        """``APPLICATION@host:port`` (how a row names its destination) back to a destination."""
        application, _, rest = text.partition("@")
        host, _, port = rest.rpartition(":")
        return cls(application, host, int(port))

    def __str__(self) -> str:
        return f"{self.application}@{self.host}:{self.port}"


@dataclass(frozen=True)
class OrthancEndpoint:
    """Orthanc's REST API for one ``[forward]`` destination (``AE@host:port``, the DICOM side of that Orthanc)."""

    destination: str
    url: str
    username: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ("url", "username", "password"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"orthanc_{name} must be a string")
        url = self.url.strip().rstrip("/")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError(f"orthanc_url = {self.url!r}: expected http(s)://host:port of Orthanc's REST API")
        object.__setattr__(self, "url", url)
        if bool(self.username) != bool(self.password):
            raise ValueError("orthanc_username and orthanc_password go together (HTTP basic authentication)")


FHIR_DESTINATION_KEYS = frozenset(
    {"url", "bearer_token_env", "bearer_token_file", "username", "password_env", "password_file", "tls_ca_file"}
)
"""The keys of an ``[fhir] destinations`` entry."""


@dataclass(frozen=True)
class FHIRDestination:
    """A FHIR R4 server's base URL and how to authenticate to it: a bearer token, or a user name and password for
    HTTP basic authentication, each secret read from an environment variable or a file (never from the
    configuration itself), and a PEM CA bundle for its TLS certificate. Only the names of the variables and files
    are held here: the secrets are read when a report is sent (``cxr_triage.outputs.fhir``)."""

    url: str
    bearer_token_env: str = ""
    bearer_token_file: str = ""
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    tls_ca_file: str = ""

    def __post_init__(self) -> None:
        for name in FHIR_DESTINATION_KEYS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        url = self.url.strip().rstrip("/")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError(f"url = {self.url!r}: expected the server's base URL, http(s)://host[:port]/path")
        if parsed.username or parsed.password:
            raise ValueError("url must not hold credentials: use username and password_env / password_file")
        object.__setattr__(self, "url", url)
        bearer = bool(self.bearer_token_env or self.bearer_token_file)
        basic = bool(self.username or self.password_env or self.password_file)
        if self.bearer_token_env and self.bearer_token_file:
            raise ValueError("bearer_token_env and bearer_token_file: name one source of the token")
        if self.password_env and self.password_file:
            raise ValueError("password_env and password_file: name one source of the password")
        if bearer and basic:
            raise ValueError("a bearer token and basic authentication: choose one")
        if basic and not (self.username and (self.password_env or self.password_file)):
            raise ValueError("basic authentication needs username and password_env or password_file")

    @classmethod
    def from_mapping(cls, mapping: object) -> FHIRDestination:
        """An ``[fhir] destinations`` entry ``{ url }`` (+ authentication and ``tls_ca_file``)."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"a destination must be a table {{url, ...}}, got {mapping!r}")
        missing, unknown = sorted({"url"} - set(mapping)), sorted(set(mapping) - FHIR_DESTINATION_KEYS)
        if missing or unknown:
            raise ValueError(f"missing keys {missing}, unknown keys {unknown} (known: {sorted(FHIR_DESTINATION_KEYS)})")
        return cls(**{str(k): v for k, v in mapping.items()})  # type: ignore[arg-type]

    def __str__(self) -> str:
        """How a row names its destination: the base URL (it holds no credentials)."""
        return self.url
