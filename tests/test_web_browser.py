"""The worklist in a real browser (Debian's headless Chromium, driven by Selenium through Debian's chromedriver),
with the real processes and the shipped model: ``cxr-triage serve`` receives a (synthetic) chest radiograph from dcmtk's
storescu, the open worklist page shows it with the priority the rules give its result without a reload, a
radiologist logs in and corrects the label, and a cross-site form post from another origin writes nothing.

Screenshots of the worklist and of the study page are written to the test's temporary folder; the README's
pictures come from ``test_web_browser_reading.py`` (real radiographs, ``CXR_SCREENSHOT_DIR``).
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import write_config
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from cxr_triage.core.settings import TriageSettings
from cxr_triage.testing import peers, synthetic
from cxr_triage.triage import flags

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PASSWORD = "correct horse battery"
WAIT = 120  # seconds: generous, the CI machine may be loaded
RERENDERED = (StaleElementReferenceException, NoSuchElementException)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not tool.exists():
            raise peers.PeerError(f"{tool} is missing: install Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,900", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: webdriver.Chrome) -> WebDriverWait[webdriver.Chrome]:
    """A wait that looks elements up again when the page re-rendered them between finding and reading."""
    return WebDriverWait(driver, WAIT, poll_frequency=0.5, ignored_exceptions=RERENDERED)


def _cli(*args: str, config: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cxr_triage", *args, "--config", str(config)]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, cwd=config.parent)


class _Web:
    """``cxr-triage web`` as a subprocess on 127.0.0.1:``port``."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Web:
        argv = [sys.executable, "-m", "cxr_triage", "web", "--config", str(self.config)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.config.parent,
                                         start_new_session=True)  # fmt: skip
        peers.wait_for_port(self.port, WAIT, "cxr-triage web", self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            peers.terminate(self.proc, timeout=20, group=True)


def _log_in(driver: webdriver.Chrome, base: str, target: str, user: str = "rad1") -> None:
    """Open ``target``, which sends the browser to the login form first, and log in there."""
    driver.get(base + target)
    _wait(driver).until(lambda d: d.find_elements(By.NAME, "username"))
    driver.find_element(By.NAME, "username").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    _wait(driver).until(lambda d: d.get_cookie("cxr_session") and not d.find_elements(By.NAME, "password"))


def _as_logged_in(driver: webdriver.Chrome, url: str) -> urllib.request.Request:
    """A request for ``url`` with the browser's session cookie."""
    cookie = driver.get_cookie("cxr_session")
    assert cookie, "logged in"
    return urllib.request.Request(url, headers={"Cookie": f"cxr_session={cookie['value']}"})


def _evil_site(target: str, port: int) -> http.server.ThreadingHTTPServer:
    """Another origin whose page posts a feedback form to ``target`` as soon as it loads."""
    page = (
        f'<html><body><form id="f" method="post" action="{target}"><input name="label" value="covid">'
        '<input name="csrf" value="guessed"></form><script>document.getElementById("f").submit()</script>'
        "</body></html>"
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_study_appears_with_its_flag_and_a_radiologist_corrects_it(browser: webdriver.Chrome, tmp_path: Path) -> None:
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    from conftest import config_values

    shots = tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    dicom_port, web_port, evil_port = peers.free_ports(3)
    values = config_values(
        tmp_path,
        None,
        listener={"port": dicom_port},
        worker={"processes": 1, "study_quiet_seconds": 1},
        web={"port": web_port, "refresh_seconds": 1.0},
    )
    values["model"]["path"] = ""  # the shipped model, with the default priority rules
    config = write_config(tmp_path / "cxr.toml", values)
    assert _cli("db", "upgrade", config=config).returncode == 0
    added = _cli("users", "add", "rad1", "--password-stdin", config=config, stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    # a synthetic chest (no patient's image ends up in a screenshot of the repository)
    image = synthetic.chest_file(tmp_path / "chest.dcm", rows=512, columns=448, seed=3)
    study = str(pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID)
    base = f"http://127.0.0.1:{web_port}"
    with (
        peers.Server(config, dicom_port, log=tmp_path / "serve.log", ready_timeout=WAIT),
        _Web(config, web_port, tmp_path / "web.log"),
    ):
        _log_in(browser, base, "/")  # reads need a login ([web] anonymous_read = false)
        assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-study="{study}"]') == [], "empty before the send"
        sent = peers.storescu(dicom_port, [image])
        assert "Received Store Response (Success)" in sent.stdout + sent.stderr or sent.returncode == 0
        # The page re-renders its rows on every refresh: read the badge's text inside the wait, where an element
        # replaced between finding and reading it (stale) is simply looked up again.
        badge = _wait(browser).until(
            lambda d: next(
                (
                    text
                    for b in d.find_elements(By.CSS_SELECTOR, f'tr[data-study="{study}"] .badge')
                    if (text := b.text) != "pending"
                ),
                None,
            )
        )
        with urllib.request.urlopen(_as_logged_in(browser, f"{base}/api/studies/{study}"), timeout=30) as response:
            (instance,) = json.loads(response.read())["instance_list"]
        expected = flags.instance_flag(instance["probabilities"], TriageSettings(), instance["model_version"])
        assert badge == expected.priority, "the page shows the priority the rules give this result"
        browser.save_screenshot(str(shots / "worklist.png"))

        browser.get(f"{base}/login?next=/studies/{study}")
        browser.find_element(By.NAME, "username").send_keys("rad1")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        _wait(browser).until(lambda d: d.find_elements(By.ID, "feedback-form"))
        Select(browser.find_element(By.NAME, "label")).select_by_value("pneumonia")
        browser.find_element(By.NAME, "comment").send_keys("right lower lobe consolidation")
        browser.find_element(By.CSS_SELECTOR, "#feedback-form button").click()
        _wait(browser).until(lambda d: d.find_element(By.ID, "feedback-label").text == "pneumonia")
        assert "rad1" in browser.find_element(By.ID, "feedback").text
        browser.set_window_size(1500, 1250)
        browser.save_screenshot(str(shots / "study.png"))

        evil = _evil_site(f"{base}/studies/{study}/feedback", evil_port)
        try:
            browser.get(f"http://localhost:{evil_port}/")  # another origin (another host name and port)
            _wait(browser).until(lambda d: d.current_url.startswith(base) or "refused" in d.page_source)
        finally:
            evil.shutdown()
        with urllib.request.urlopen(_as_logged_in(browser, f"{base}/api/feedback"), timeout=30) as response:
            feedback = json.loads(response.read())
    assert [(f["username"], f["label_after"]) for f in feedback] == [("rad1", "pneumonia")], (
        "the forged post wrote nothing"
    )
    assert (shots / "worklist.png").stat().st_size > 10_000 and (shots / "study.png").stat().st_size > 10_000
