"""Real peers for the end-to-end tests: Orthanc, a throwaway PostgreSQL cluster, dcmtk tools, `cxr-triage serve`.

Everything here talks on 127.0.0.1 with ports picked at run time. Orthanc and dcmtk's ``storescp`` bind every
interface, so they are only started inside a private network namespace (``netns_command`` wraps a scenario script
in ``unshare -n`` with the loopback up); ``Orthanc`` refuses to start in the host's namespace. PostgreSQL binds
127.0.0.1 only and refuses to run as root, so its cluster runs as the ``postgres`` user in a temp dir under /tmp.

Every helper that starts a process is a context manager that stops it on exit, failure included, and every wait
has a deadline. A missing tool raises ``PeerError``: the tests fail, they never skip.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SAMPLE_CR = SHARED / "data" / "dicom" / "pydicom-data_RG1_UNCR.dcm"
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)."""
PG_ROOT = Path("/usr/lib/postgresql")
"""Debian's PostgreSQL server binaries live in PG_ROOT/<major>/bin; the newest installed is used."""
DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
"""Where dcmtk is looked for first: pynetdicom installs Python apps under the same names (storescu, ...)."""

T = TypeVar("T")


class PeerError(RuntimeError):
    """A peer is missing, did not start, or died."""


# --------------------------------------------------------------------------------------------- ports, waits, netns


_HANDED_OUT: set[int] = set()
"""Ports ``free_ports`` has returned in this process: it never returns one twice."""


def worker_slot(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(this pytest-xdist worker's index, the number of workers) from the variables xdist sets in each worker
    (``PYTEST_XDIST_WORKER=gw1``, ``PYTEST_XDIST_WORKER_COUNT=2``); (0, 1) outside xdist. Subprocesses inherit
    them, so a scenario script or ``serve`` started by a test picks its ports in the same share."""
    env = os.environ if environ is None else environ
    name, count = env.get("PYTEST_XDIST_WORKER", ""), env.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (name.startswith("gw") and name[2:].isdigit() and count.isdigit() and int(count) > 1):
        return 0, 1
    return int(name[2:]) % int(count), int(count)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (see ``free_ports``)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now.

    The kernel picks them (bind to port 0), and of those only ports this process has not been given before and,
    under pytest-xdist, ports in this worker's share ((port >> 1) % workers == worker index: Linux gives bind(0) odd
    ports, leaving the even ones to outgoing connections) are kept. A port is free only until someone binds it, and
    the tests hand theirs to a server that binds it later: so no two workers of one run can pick the same port in
    that gap, and no test gets a port an earlier test of its worker may still hold.
    """
    index, workers = worker_slot()
    kept: list[socket.socket] = []
    passed: list[socket.socket] = []  # held open while picking, so that the kernel offers other ports
    try:
        while len(kept) < count:
            if len(passed) > 64 * workers + 64:
                raise PeerError(f"no free port for worker {index} of {workers} after {len(passed)} tries")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            ours = (port >> 1) % workers == index and port not in _HANDED_OUT  # bind(0) gives odd ports
            (kept if ours else passed).append(sock)
        ports = [int(s.getsockname()[1]) for s in kept]
        _HANDED_OUT.update(ports)
        return ports
    finally:
        for sock in kept + passed:
            sock.close()


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float, what: str, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; fail at once if ``proc`` exits first."""

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        return port_open(port)

    wait_until(ready, timeout, f"{what} to listen on 127.0.0.1:{port}")


def dicom_ready(port: int, called_ae: str, calling_ae: str = "READY_PROBE") -> bool:
    """True when a DICOM SCP on 127.0.0.1:``port`` answers an association request (accepted or rejected).

    Used instead of a bare TCP connect, which leaves the server an association waiting for a request until its
    ACSE timeout (and so delays its shutdown).
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    try:
        return bool(assoc.is_established or assoc.is_rejected)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def in_private_netns() -> bool:
    """True when loopback is this network namespace's only interface (as inside ``netns_command``)."""
    return {name for _, name in socket.if_nameindex()} == {"lo"}


def netns_command(argv: Sequence[str]) -> list[str]:
    """``argv`` run in a new network namespace holding only a loopback interface, brought up."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            raise PeerError(f"{tool} is not installed (util-linux / iproute2): needed to isolate the test network")
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    return [*unshare, "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *argv]


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so that a scenario's ``finally`` blocks stop the peers it started."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_scenario(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a scenario script; past ``timeout`` it gets SIGTERM (to clean up), then SIGKILL 60 s later."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        err = f"{err}\nscenario killed after {timeout:.0f} s"
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def terminate(proc: subprocess.Popen[Any], timeout: float = 15.0, group: bool = False) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; ``group`` signals the process group ``proc`` leads."""
    if proc.poll() is not None:
        return proc.returncode

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d ignored SIGTERM for %.0f s: killing it", proc.pid, timeout)
        send(signal.SIGKILL)
        return proc.wait(10)


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


# --------------------------------------------------------------------------------------------- dcmtk


def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's ``name`` (storescu, storescp, echoscu, ...), not a same-named Python app."""
    candidates = [str(Path(d) / name) for d in DCMTK_DIRS]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
        if "dcmtk" in (probe.stdout + probe.stderr).lower():
            return candidate
    raise PeerError(f"dcmtk's {name} is not installed (Debian package dcmtk)")


def storescu(
    port: int,
    files: Sequence[os.PathLike[str] | str],
    *,
    called_ae: str = "CXR_TRIAGE",
    calling_ae: str = "STORESCU",
    timeout: float = 60.0,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` to 127.0.0.1:``port`` with dcmtk's storescu, one association; returns the finished process.

    Callers check what the receiver recorded rather than the exit status.
    """
    argv = [
        dcmtk_tool("storescu"),
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "30",
        *extra,
        "127.0.0.1",
        str(port),
        *[str(f) for f in files],
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout: float = 20.0) -> bool:
    """C-ECHO with dcmtk's echoscu; True when the peer answered success."""
    argv = [dcmtk_tool("echoscu"), "-aet", calling_ae, "-aec", called_ae, "-to", "10", "127.0.0.1", str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout).returncode == 0


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
"""Debian's libpixelmed-java."""
# Pixelmed's own main() takes one file, and building the validator (compiling its XSLT) takes most of a run, so
# this driver builds it once for all files; options as in that main(): code meanings matched with case, no extras.
_PIXELMED_DRIVER = """
public class ValidateSRs {
    public static void main(String[] args) throws Exception {
        com.pixelmed.validate.DicomSRValidator validator = new com.pixelmed.validate.DicomSRValidator();
        for (int i = 0; i < args.length; i++) {
            System.out.println("==> " + i);
            try {
                System.out.print(validator.validate(args[i], false, true, false, false, false));
            } catch (Exception e) {
                System.out.println("Error: the validator failed on this file: " + e);
            }
        }
        System.out.println("==> end");
    }
}
"""


def pixelmed_validate(
    paths: Sequence[os.PathLike[str] | str], timeout: float = 600.0
) -> dict[str, tuple[list[str], list[str]]]:
    """Check SR files with Pixelmed's ``DicomSRValidator`` (IOD and SR templates; IHE's AIR test tools use it).

    All files are checked in one JVM. Returns, for each path (as ``str(path)``), its error lines and its warning
    lines as the validator prints them (``Error: ...``, ``Warning: <content item position>: ...``). Raises
    ``PeerError`` when Java or Pixelmed is missing or the validator could not run.
    """
    java = shutil.which("java")
    if java is None:
        raise PeerError("java is not installed (Debian package default-jre-headless): needed by Pixelmed")
    if not PIXELMED_JAR.is_file():
        raise PeerError(f"{PIXELMED_JAR} is missing (Debian package libpixelmed-java)")
    names = [str(path) for path in paths]
    with tempfile.TemporaryDirectory(prefix="pixelmed-") as scratch:
        driver = Path(scratch) / "ValidateSRs.java"
        driver.write_text(_PIXELMED_DRIVER)
        argv = [
            java,
            # Java 17's XPath limits stop Pixelmed's template rules otherwise.
            "-Djdk.xml.xpathExprOpLimit=0",
            "-Djdk.xml.xpathExprGrpLimit=0",
            "-Djdk.xml.xpathTotalOpLimit=0",
            "-XX:TieredStopAtLevel=1",  # one short run: quick compilation beats peak speed
            "-XX:+UseSerialGC",
            "-cp",
            str(PIXELMED_JAR),
            str(driver),
            *names,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    markers = [f"==> {index}" for index in range(len(names))] + ["==> end"]
    sections: list[list[str]] = []
    for line in done.stdout.splitlines():
        if line == markers[min(len(sections), len(names))]:
            sections.append([])
        elif sections:
            sections[-1].append(line)
    if done.returncode != 0 or len(sections) != len(names) + 1:
        raise PeerError(f"Pixelmed's DicomSRValidator failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {
        name: ([x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")])
        for name, lines in zip(names, sections, strict=False)
    }


class Storescp:
    """dcmtk's storescp writing what it receives into ``directory`` (binds every interface: private netns only)."""

    def __init__(self, directory: Path, port: int, ae_title: str = "STORESCP") -> None:
        self.directory = Path(directory)
        self.port = port
        self.ae_title = ae_title
        self.log = self.directory.parent / f"storescp-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Storescp:
        if not in_private_netns():
            raise PeerError("storescp binds every interface: start it inside netns_command(...) only")
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [dcmtk_tool("storescp"), "-aet", self.ae_title, "+xa", "-od", str(self.directory), str(self.port)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, 20, "storescp", self.proc)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=5)

    def received(self) -> list[Path]:
        """Files completely written so far (storescp writes to the final name after the transfer)."""
        return sorted(p for p in self.directory.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------------- Orthanc


class Orthanc:
    """An Orthanc server with a generated configuration, driven through its REST API on 127.0.0.1.

    ``modalities`` maps a symbolic name to (AE title, port) on 127.0.0.1; ``lua_scripts`` and ``plugins`` (shared
    libraries, e.g. ``ORTHANC_DICOMWEB``) are loaded as given. With ``user`` (name, password) its HTTP API requires
    that user (basic authentication), which the REST helpers here then send.
    """

    def __init__(
        self,
        workdir: Path,
        dicom_port: int,
        http_port: int,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, int]] | None = None,
        lua_scripts: Sequence[Path] = (),
        base: Mapping[str, Any] | None = None,
        plugins: Sequence[Path] = (),
        user: tuple[str, str] | None = None,
    ) -> None:
        self.user = user
        self.workdir = Path(workdir)
        self.plugins = [Path(p) for p in plugins]
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.lua_scripts = [Path(p).resolve() for p in lua_scripts]
        self.base = dict(base or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def configuration(self) -> dict[str, Any]:
        """``base`` (e.g. a production file) with ports, storage, network and modality addresses made local."""
        modalities = copy.deepcopy(dict(self.base.get("DicomModalities", {})))
        for name, (aet, port) in self.modalities.items():
            entry = modalities.get(name)
            entry = dict(entry) if isinstance(entry, Mapping) else {}
            modalities[name] = {**entry, "AET": aet, "Host": "127.0.0.1", "Port": port}
        local = {
            "Name": self.base.get("Name", "cxr-triage-e2e"),
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.user is not None,
            "RegisteredUsers": dict([self.user]) if self.user else {},
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomScuTimeout": 30,
            "DicomModalities": modalities,
            "LuaScripts": [str(p) for p in self.lua_scripts],
            "Plugins": [str(p) for p in self.plugins],
            "StableAge": 2,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
        }
        return {**self.base, **local}

    def __enter__(self) -> Orthanc:
        if not ORTHANC_BIN.exists():
            raise PeerError(f"{ORTHANC_BIN} is missing (Debian package orthanc)")
        for plugin in self.plugins:
            if not plugin.exists():
                raise PeerError(f"the Orthanc plugin {plugin} is missing (Debian package orthanc-dicomweb?)")
        if not in_private_netns():
            raise PeerError("Orthanc binds every interface: start it inside netns_command(...) only")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2))
        with self.log.open("wb") as log:
            argv = [str(ORTHANC_BIN), str(self.config_path)]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.http_port, 30, "Orthanc HTTP", self.proc)
            wait_until(self._system_ok, 30, "Orthanc's REST API")
            wait_for_port(self.dicom_port, 30, "Orthanc DICOM", self.proc)
        except BaseException as exc:
            self.__exit__(None, None, None)
            if not isinstance(exc, Exception):
                raise
            raise PeerError(f"Orthanc did not start: {exc}\n--- orthanc.log ---\n{tail(self.log)}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=15)

    def _system_ok(self) -> bool:
        try:
            return "Version" in self.get("/system")
        except (OSError, urllib.error.URLError):
            return False

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        """A REST call; the answer parsed as JSON (None when empty)."""
        data = self.request_bytes(path, method, body, content_type)
        return json.loads(data) if data else None

    def request_bytes(
        self, path: str, method: str = "GET", body: bytes | None = None, content_type: str = "", accept: str = ""
    ) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        headers = {"Content-Type": content_type} if content_type else {}
        if accept:
            headers["Accept"] = accept
        if self.user:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.user).encode()).decode()
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                data = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise PeerError(f"Orthanc {method} {path}: HTTP {exc.code}: {detail}") from exc
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, path: os.PathLike[str] | str) -> dict[str, Any]:
        """POST /instances: store one DICOM file; returns Orthanc's answer (ID, ParentStudy, Status...)."""
        return self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")

    def store_to_modality(self, modality: str, resources: Sequence[str]) -> Any:
        """C-STORE ``resources`` (Orthanc IDs) to a configured modality, waiting for the job to finish."""
        return self.post(f"/modalities/{modality}/store", {"Resources": list(resources), "Synchronous": True})


def read_orthanc_json(path: Path) -> dict[str, Any]:
    """An Orthanc configuration file, whose whole-line ``//`` comments Orthanc accepts and ``json`` does not."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")]
    return json.loads("\n".join(lines))


# --------------------------------------------------------------------------------------------- PostgreSQL


def _pg_tool(name: str) -> str:
    found = [p / "bin" / name for p in PG_ROOT.glob("*") if p.name.isdigit()]
    found = [p for p in found if os.access(p, os.X_OK)]
    if not found:
        raise PeerError(f"PostgreSQL's {name} is not under {PG_ROOT}/<version>/bin (Debian package postgresql)")
    return str(max(found, key=lambda p: int(p.parent.parent.name)))


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port`` with trust authentication and one database (more with
    ``create_database``: the tests share one cluster per pytest process, a fresh database per test).

    The server refuses to run as root, so under root it runs as the ``postgres`` user in a temp dir under /tmp
    (pytest's tmp dirs are private to root). ``url`` is a SQLAlchemy URL using psycopg 3.
    """

    def __init__(self, database: str = "cxr", port: int | None = None, user: str = "postgres") -> None:
        self.database = database
        self.port = port or free_port()
        self.user = user
        self.root: Path | None = None
        self.started = False

    @property
    def url(self) -> str:
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` in this cluster."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database ``name`` in this running cluster; its URL (the tests' ``postgres_url``)."""
        self._run([_pg_tool("createdb"), *self._client_args(), name], f"createdb {name}")
        return self.url_of(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, cutting the connections still open to it (a test's leftover pool or process)."""
        self._run([_pg_tool("dropdb"), "--force", *self._client_args(), name], f"dropdb {name}")

    def _client_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user]

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        if shutil.which("runuser") is None:
            raise PeerError("runuser is missing: needed to run PostgreSQL as a non-root user")
        return ["runuser", "-u", self.user, "--", *argv]

    def _run(self, argv: list[str], what: str, timeout: float = 60) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = tail(self.log) if self.root and self.log.exists() else ""
            raise PeerError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")

    def __enter__(self) -> PostgresCluster:
        self.root = Path(tempfile.mkdtemp(prefix="cxr-pg-", dir="/tmp"))
        try:
            if os.geteuid() == 0:
                try:
                    owner = pwd.getpwnam(self.user)
                except KeyError as exc:
                    raise PeerError(f"no {self.user!r} user to run PostgreSQL as (install postgresql)") from exc
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
            data = self.root / "data"
            self._run(
                self._as_owner(
                    [_pg_tool("initdb"), "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8"]
                    + ["--locale=C", "--no-sync"]
                ),
                "initdb",
            )
            self.start_server()
            self.create_database(self.database)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start_server(self) -> None:
        """Start the cluster's server (again, after ``stop_server``) and wait until it accepts connections."""
        assert self.root is not None
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off -c max_connections=50"
        )
        data = self.root / "data"
        argv = [_pg_tool("pg_ctl"), "-D", str(data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"]
        self._run(self._as_owner(argv), "pg_ctl start")
        self.started = True

    def stop_server(self) -> None:
        """Stop the server as an outage would (fast shutdown: open connections are cut), keeping its data."""
        assert self.root is not None
        argv = [_pg_tool("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60", "stop"]
        self._run(self._as_owner(argv), "pg_ctl stop")
        self.started = False

    def __exit__(self, *exc: object) -> None:
        if self.root is None:
            return
        try:
            if self.started:
                argv = [_pg_tool("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60", "stop"]
                done = subprocess.run(self._as_owner(argv), capture_output=True, text=True, timeout=90)
                if done.returncode != 0:
                    logger.error("pg_ctl stop failed: %s%s", done.stdout, done.stderr)
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


# --------------------------------------------------------------------------------------------- test data


def make_tiny_checkpoint(path: Path, version: str = "test-tiny") -> Path:
    """A classifier checkpoint with random weights and a tiny width: fast on the CPU, meaningless predictions."""
    from cxr_triage.ml.checkpoint import ModelCard, save_classifier
    from cxr_triage.ml.model import CAEClassifier, ModelSpec

    model = CAEClassifier(ModelSpec(width=4, dense_units=8))
    save_classifier(path, model, ModelCard(spec=model.spec, model_version=version))
    return path


# --------------------------------------------------------------------------------------------- cxr-triage


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def example_config(name: str, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The repo's example ``config/NAME.toml`` with ``overrides`` (section -> key -> value) applied on top."""
    with (REPO / "config" / f"{name}.toml").open("rb") as fh:
        sections: dict[str, dict[str, Any]] = tomllib.load(fh)
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


def gate_off(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``sections`` with the typicality gate turned off, where this release has one (a ``[gate]`` table in the
    defaults): the synthetic phantoms of the tests and benchmarks are not chest radiographs to it."""
    from cxr_triage.core.config import load_config

    if "gate" in load_config(None, environ={}).values:
        sections.setdefault("gate", {})["enabled"] = False
    return sections


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a cxr-triage TOML configuration holding ``sections`` (tables of plain values)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def cli(
    *args: str, config: Path, timeout: float = 120, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cxr-triage ARGS --config CONFIG`` in a subprocess with the current interpreter."""
    argv = [sys.executable, "-m", "cxr_triage", *args, "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=config.parent, env=env)
    if check and done.returncode != 0:
        raise PeerError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def results(config: Path) -> list[dict[str, Any]]:
    """The rows ``cxr-triage results --json`` prints (one JSON object a line)."""
    out = cli("results", "--json", config=config, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class Server:
    """``cxr-triage serve --config CONFIG`` as a subprocess (own process group, so its workers stop with it)."""

    def __init__(
        self,
        config: Path,
        port: int,
        log: Path | None = None,
        ready_timeout: float = 60,
        ae_title: str = "CXR_TRIAGE",
    ) -> None:
        self.config = config
        self.port = port
        self.ae_title = ae_title
        self.log = log or config.with_suffix(".serve.log")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Server:
        argv = [sys.executable, "-m", "cxr_triage", "--log-level", "INFO", "serve", "--config", str(self.config)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.config.parent, start_new_session=True
            )
        try:
            wait_until(self._ready, self.ready_timeout, f"cxr-triage serve to answer on 127.0.0.1:{self.port}", 0.5)
        except BaseException as exc:
            self.__exit__(None, None, None)
            if not isinstance(exc, Exception):
                raise
            raise PeerError(f"cxr-triage serve did not start: {exc}\n--- serve log ---\n{tail(self.log)}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.returncode = terminate(self.proc, timeout=20, group=True)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PeerError(f"cxr-triage serve exited with status {self.proc.returncode}")
        return dicom_ready(self.port, self.ae_title)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
