"""Reading the worklist in a real browser (Debian's Chromium through Selenium, as ``test_web_browser.py``), with
the real processes and the shipped model on real radiographs (``../shared/data``) sent with ``cxr-triage send``:
the page asks for a login before it shows anything, a new urgent study raises the banner and the title badge
without a reload, and a radiologist moves with ``j``/``k``, confirms with ``c`` and corrects with a number, each
study then leaving the unread view.

Every study is made urgent here (``[triage] covid_threshold = 0``) so that the alert does not depend on what the
model makes of an image. With ``CXR_SCREENSHOT_DIR`` set, the README's pictures are written there.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from conftest import SHARED, config_values, write_config
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from test_web_browser import WAIT, _as_logged_in, _cli, _log_in, _wait, _Web
from test_web_browser import browser as browser  # the fixture

from cxr_triage.testing import peers, synthetic

SHARED_CXR = SHARED / "data" / "cxr"


def _radiograph(jpeg: Path, out: Path, **attributes: str) -> Path:
    """A shared chest radiograph (JPEG) as a DX DICOM file of its own study."""
    pixels = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint8)
    ds = synthetic.new_dataset(pixels, **attributes)
    ds.save_as(out, enforce_file_format=True)
    return out


def _rows(driver: webdriver.Chrome) -> list[str]:
    # read in the page in one call: the worklist re-renders its rows every refresh, so an element found in one
    # WebDriver call may be stale by the next (seen on a loaded machine)
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#worklist tbody tr'), tr => tr.dataset.study);"
    )


def _selected(driver: webdriver.Chrome) -> str | None:
    return driver.execute_script(
        "const tr = document.querySelector('#worklist tbody tr.selected'); return tr ? tr.dataset.study : null;"
    )


def _press(driver: webdriver.Chrome, key: str) -> None:
    ActionChains(driver).send_keys(key).perform()


def test_login_then_an_urgent_alert_then_keys_confirm_and_correct(browser: webdriver.Chrome, tmp_path: Path) -> None:
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    dicom_port, web_port = peers.free_ports(2)
    viewer = "https://pacs.example/viewer?StudyInstanceUIDs={StudyInstanceUID}"
    fields = ["AccessionNumber", "PatientAge", "PatientSex", "StudyDescription"]
    values = config_values(
        tmp_path, None, listener={"port": dicom_port}, worker={"processes": 1, "study_quiet_seconds": 1},
        web={"port": web_port, "refresh_seconds": 1.0, "viewer_url": viewer, "patient_fields": fields},
        triage={"covid_threshold": 0.0},
    )  # fmt: skip
    values["model"]["path"] = ""  # the shipped model
    config = write_config(tmp_path / "cxr.toml", values)
    assert _cli("db", "upgrade", config=config).returncode == 0
    assert (
        _cli("users", "add", "rad1", "--password-stdin", config=config, stdin="correct horse battery\n").returncode == 0
    )
    first = SHARED / "data" / "dicom" / "nih-cxr14-dx-no-finding.dcm"
    second = _radiograph(
        next((SHARED_CXR / "images").rglob("pneumonia*.jpg")), tmp_path / "second.dcm", AccessionNumber="ACC-2002",
        PatientAge="047Y", PatientSex="F", StudyDescription="CHEST PA",
    )  # fmt: skip
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in (first, second)]
    base = f"http://127.0.0.1:{web_port}"
    with (
        peers.Server(config, dicom_port, log=tmp_path / "serve.log", ready_timeout=WAIT),
        _Web(config, web_port, tmp_path / "web.log"),
    ):
        browser.get(base + "/")
        assert "/login" in browser.current_url and _rows(browser) == [], "nothing before a login"
        _log_in(browser, base, "/")
        _wait(browser).until(lambda d: d.find_elements(By.ID, "worklist"))
        title = browser.title
        for count, (path, uid) in enumerate(zip((first, second), uids, strict=True), start=1):
            sent = _cli("send", str(path), config=config)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            _wait(browser).until(lambda d, uid=uid: uid in _rows(d) and d.find_element(
                By.CSS_SELECTOR, f'tr[data-study="{uid}"]').get_attribute("data-priority") == "urgent")  # fmt: skip
            _wait(browser).until(lambda d, n=count: d.title.startswith(f"({n}) URGENT"))
            assert browser.find_element(By.ID, "alert").is_displayed(), "a visible banner, no reload"
        assert "047Y F" in browser.page_source and "CHEST PA" in browser.page_source
        _wait(browser).until(lambda d: d.find_element(By.ID, "model").text.startswith("model: "))
        assert "none yet" not in browser.find_element(By.ID, "model").text, "the model named once, above the rows"

        _press(browser, "j")
        order = _rows(browser)
        assert _selected(browser) == order[0] and browser.title == title, "a key press marks the alert seen"
        _press(browser, "j")
        assert _selected(browser) == order[1]
        _press(browser, "k")
        assert _selected(browser) == order[0]
        _press(browser, "c")  # confirm the model's label of the first
        _wait(browser).until(lambda d: _rows(d) == order[1:])
        assert _selected(browser) == order[1], "the next study is selected"
        _press(browser, "3")  # correct the second to pneumonia
        _wait(browser).until(lambda d: _rows(d) == [])
        with urllib.request.urlopen(_as_logged_in(browser, f"{base}/api/feedback"), timeout=30) as response:
            feedback = json.loads(response.read())
        assert [(f["study_instance_uid"], f["confirmed"]) for f in feedback][0] == (order[0], True)
        assert (feedback[1]["study_instance_uid"], feedback[1]["label_after"]) == (order[1], "pneumonia")

        browser.get(base + "/?read=all")
        _wait(browser).until(lambda d: sorted(_rows(d)) == sorted(uids))
        assert not browser.find_element(By.ID, "alert").is_displayed(), "studies there at load raise no alert"
        browser.find_element(By.CSS_SELECTOR, 'th[data-sort="arrived"]').click()
        _wait(browser).until(lambda d: _rows(d) == uids[::-1])  # by arrival, newest first
        browser.find_element(By.CSS_SELECTOR, 'th[data-sort="probability"]').click()
        _wait(browser).until(lambda d: _rows(d) == order)  # by the probability that matters
        link = browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{order[1]}"] a.viewer-link')
        assert link.get_attribute("href") == viewer.replace("{StudyInstanceUID}", order[1])
        _press(browser, "j")
        _press(browser, "\n")
        _wait(browser).until(lambda d: "/studies/" in d.current_url and d.find_elements(By.ID, "viewer-link"))

        browser.get(base + "/docs")
        _wait(browser).until(lambda d: "cxr-triage worklist" in d.find_element(By.ID, "swagger-ui").text)


def test_the_readme_pictures_on_real_radiographs(browser: webdriver.Chrome, tmp_path: Path) -> None:
    """The README's screenshots: the shipped model and the default rules on the shared DICOM files and on some of
    the shared JPEG radiographs (wrapped as DICOM with an accession number and a description, no demographics)."""
    shots = Path(os.environ.get("CXR_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    dicom_port, web_port = peers.free_ports(2)
    fields = ["AccessionNumber", "PatientAge", "PatientSex", "StudyDescription"]
    values = config_values(
        tmp_path, None, listener={"port": dicom_port}, worker={"processes": 1, "study_quiet_seconds": 1},
        web={"port": web_port, "refresh_seconds": 1.0, "patient_fields": fields,
             "viewer_url": "https://pacs.example/viewer?StudyInstanceUIDs={StudyInstanceUID}"},
    )  # fmt: skip
    values["model"]["path"] = ""
    config = write_config(tmp_path / "cxr.toml", values)
    assert _cli("db", "upgrade", config=config).returncode == 0
    added = _cli("users", "add", "rad1", "--password-stdin", config=config, stdin="correct horse battery\n")
    assert added.returncode == 0, added.stderr
    dicom = SHARED / "data" / "dicom"
    files = [dicom / "nih-cxr14-dx-no-finding.dcm", dicom / "pydicom-data_RG1_J2KI.dcm"]
    jpegs = sorted((SHARED_CXR / "images" / "covid19_image_dataset_3class_640sq").glob("*.jpg"))
    for n, kind in enumerate(("covid", "covid", "pneumonia", "pneumonia", "normal", "normal")):
        jpeg = [j for j in jpegs if j.name.startswith(kind)][n % 2]
        files.append(_radiograph(jpeg, tmp_path / f"{n}.dcm", AccessionNumber=f"ACC-{3001 + n}",
                                 StudyDescription="CHEST PA"))  # fmt: skip
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    base = f"http://127.0.0.1:{web_port}"
    with (
        peers.Server(config, dicom_port, log=tmp_path / "serve.log", ready_timeout=WAIT),
        _Web(config, web_port, tmp_path / "web.log"),
    ):
        _log_in(browser, base, "/")
        sent = _cli("send", *map(str, files), config=config)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait(browser).until(
            lambda d: (
                set(_rows(d)) == uids
                and all(
                    tr.get_attribute("data-priority") != "pending"
                    for tr in d.find_elements(By.CSS_SELECTOR, "tbody tr")
                )
            )
        )
        _wait(browser).until(lambda d: "provisional" not in d.find_element(By.ID, "worklist").text)
        _press(browser, "j")
        top = _selected(browser)
        browser.save_screenshot(str(shots / "worklist.png"))
        browser.get(f"{base}/studies/{top}")
        _wait(browser).until(lambda d: d.find_elements(By.ID, "feedback-form"))
        browser.set_window_size(1500, 1250)
        _wait(browser).until(lambda d: d.find_element(By.ID, "viewer").get_attribute("data-state") == "radiograph")
        browser.save_screenshot(str(shots / "study.png"))
    assert (shots / "worklist.png").stat().st_size > 10_000 and (shots / "study.png").stat().st_size > 10_000
