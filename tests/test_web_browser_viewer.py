"""The study page's viewer in a real browser (Debian's headless Chromium through Selenium, as
``test_web_browser.py``): a real shared radiograph (1955 x 1841 CR, MONOCHROME1, JPEG 2000 lossless), classified by
the shipped model, with its Grad-CAM map computed by the shipped model and stored as the worker will
(``save_coarse``, ``instances.heatmap_path``), shown by ``cxr-triage web`` at its own resolution: at 1:1 the
canvas holds the decoded pixels through the DICOM's window, the heatmap toggle changes them and shows the colour
scale, a shift-drag changes the window and "r" resets it.

The listener and worker run in-process (the harness); the page is the real ``cxr-triage web`` process. With
``CXR_SCREENSHOT_DIR`` set, the README's picture of the viewer is written there.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DICOM, write_config
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.mouse_button import MouseButton
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from sqlalchemy import select, update
from test_web_browser import _cli, _log_in, _wait, _Web
from test_web_browser import browser as browser  # the fixture

from cxr_triage import BUNDLED_MODEL
from cxr_triage.core import db
from cxr_triage.ml.checkpoint import load_classifier
from cxr_triage.ml.heatmap import GradCAMHeatmap, save_coarse
from cxr_triage.ml.preprocess import PreparedImage, prepare_path
from cxr_triage.ops.retention import purge_spool
from cxr_triage.testing import peers

RADIOGRAPH = SHARED_DICOM / "pydicom-data_RG1_J2KR.dcm"
UNCOMPRESSED = SHARED_DICOM / "pydicom-data_RG1_UNCR.dcm"  # the same pixels, to compute what the canvas must hold
PATCH = 8  # pixels a side of the canvas patch read back


def _store_heatmap(harness: Any, path: Path) -> Path:
    """The shipped model's Grad-CAM of ``path``, stored and recorded on its instance as the worker will."""
    prepared = prepare_path(path)
    assert isinstance(prepared, PreparedImage), prepared
    coarse = GradCAMHeatmap(load_classifier(BUNDLED_MODEL).model).coarse(prepared.tensor[None]).maps[0]
    stored = save_coarse(harness.tmp / "heatmaps" / "1.npy", coarse)
    with harness.sessions() as session, session.begin():
        session.execute(update(db.Instance).values(heatmap_path=str(stored)))
    return stored


def _state(driver: webdriver.Chrome, name: str) -> str:
    return str(driver.find_element(By.ID, "viewer").get_attribute(f"data-{name}"))


def _patch(driver: webdriver.Chrome, x: int, y: int) -> np.ndarray:
    """The visible canvas's RGB pixels in a PATCH x PATCH square at (x, y), read back through JavaScript."""
    data = driver.execute_script(
        "const c = document.getElementById('viewer-canvas');"
        "return Array.from(c.getContext('2d').getImageData(arguments[0], arguments[1], arguments[2], arguments[2])"
        ".data);",
        x, y, PATCH,
    )  # fmt: skip
    return np.asarray(data, dtype=np.int32).reshape(PATCH, PATCH, 4)[..., :3]


def _windowed(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) then the MONOCHROME1 inversion, as 8-bit grey."""
    y = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return np.rint(255 * (1 - y)).astype(np.int32)


def _origin(driver: webdriver.Chrome) -> list[float]:
    """Where the image's top-left pixel is on the canvas (canvas pixels)."""
    return [float(v) for v in _state(driver, "origin").split(",")]


def _rendered(driver: webdriver.Chrome, before: str) -> Any:
    return _wait(driver).until(lambda d: _state(d, "rendered") != before)


def _after_retention(browser: webdriver.Chrome, harness: Any, heatmap: Path) -> None:
    """Once the spool no longer keeps the file and the map is gone, the page says so and shows the thumbnail."""
    assert purge_spool(harness.sessions, 1.0, now=db.utcnow() + dt.timedelta(days=2)) == 1
    heatmap.unlink()
    browser.refresh()
    _wait(browser).until(lambda d: _state(d, "state") == "thumbnail")
    note = browser.find_element(By.ID, "viewer-note").text
    assert "no longer kept" in note and "the model's 224x224 input instead" in note and "No heatmap" in note
    assert (_state(browser, "rows"), _state(browser, "columns"), _state(browser, "heatmap")) == ("224", "224", "none")
    assert not browser.find_element(By.ID, "heatmap-toggle").is_enabled(), "no map: the toggle is disabled"
    assert not browser.find_element(By.ID, "window-reset").is_enabled(), "8-bit thumbnail: no window/level"
    cx, cy = browser.execute_script("const c = document.getElementById('viewer-canvas'); return [c.width >> 1, "
                                    "c.height >> 1];")  # fmt: skip
    assert _patch(browser, cx, cy).max() > 20, "the thumbnail is drawn (the canvas is black without a picture)"
    canvas, start = browser.find_element(By.ID, "viewer-canvas"), _origin(browser)
    ActionChains(browser).key_down(Keys.SHIFT).click_and_hold(canvas).move_by_offset(30, 0).release().key_up(
        Keys.SHIFT
    ).perform()  # no window to drag on an 8-bit thumbnail: the drag pans
    _wait(browser).until(lambda d: _origin(d)[0] == pytest.approx(start[0] + 30))


def test_the_radiograph_at_its_resolution_with_the_heatmap_toggled_and_windowed(
    browser: webdriver.Chrome, make_harness: Any, tmp_path: Path
) -> None:
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    harness = make_harness(model=BUNDLED_MODEL)
    assert harness.send([RADIOGRAPH]) == [0]
    harness.work()
    heatmap = _store_heatmap(harness, RADIOGRAPH)
    with harness.sessions() as session:
        uid = session.scalar(select(db.Instance.study_instance_uid))
    (web_port,) = peers.free_ports(1)
    values = {section: dict(table) for section, table in harness.config.items()}
    values["web"] = {**values["web"], "port": web_port}
    config = write_config(tmp_path / "cxr.toml", values)
    added = _cli("users", "add", "rad1", "--password-stdin", config=config, stdin="correct horse battery\n")
    assert added.returncode == 0, added.stderr
    expected = pydicom.dcmread(UNCOMPRESSED).pixel_array.astype(np.float64)
    base = f"http://127.0.0.1:{web_port}"
    with _Web(config, web_port, tmp_path / "web.log"):
        _log_in(browser, base, f"/studies/{uid}")
        _wait(browser).until(lambda d: _state(d, "state") == "radiograph")
        assert (_state(browser, "rows"), _state(browser, "columns")) == ("1955", "1841"), "its own resolution"
        assert "window from the DICOM header" in browser.find_element(By.ID, "viewer-note").text
        assert not browser.find_element(By.ID, "heatmap-legend").is_displayed(), "no legend while the map is off"

        before = _state(browser, "rendered")
        browser.find_element(By.ID, "zoom-actual").click()  # one image pixel per canvas pixel
        _rendered(browser, before)
        assert _state(browser, "zoom") == "1"
        ox, oy = (int(float(v)) for v in _state(browser, "origin").split(","))
        x, y = 900 + ox, 1000 + oy  # image pixel (900, 1000), inside the lungs' field, as a canvas position
        grey = _patch(browser, x, y)
        want = _windowed(expected[1000 : 1000 + PATCH, 900 : 900 + PATCH], 15000, 30000)
        assert np.all(grey[..., 0] == grey[..., 2]) and np.abs(grey[..., 0] - want).max() <= 1, "decoded, windowed"

        before = _state(browser, "rendered")
        browser.find_element(By.ID, "heatmap-toggle").click()
        _rendered(browser, before)
        assert _state(browser, "heatmap") == "on" and browser.find_element(By.ID, "heatmap-legend").is_displayed()
        legend = browser.find_element(By.ID, "heatmap-legend").text
        assert "0" in legend and "1" in legend and "relative attention" in legend and "not a diagnosis" in legend
        coloured = _patch(browser, x, y)
        assert np.abs(coloured - grey).max() > 10 and np.any(coloured[..., 0] != coloured[..., 2]), "overlay drawn"

        canvas = browser.find_element(By.ID, "viewer-canvas")
        before = _state(browser, "rendered")
        canvas.send_keys("h")  # the key toggles it off again
        _rendered(browser, before)
        assert _state(browser, "heatmap") == "off" and np.array_equal(_patch(browser, x, y), grey)

        before = _state(browser, "rendered")
        ActionChains(browser).key_down(Keys.SHIFT).click_and_hold(canvas).move_by_offset(-150, 0).release().key_up(
            Keys.SHIFT
        ).perform()  # shift-drag to the left: a narrower window
        _wait(browser).until(lambda d: float(_state(d, "window-width")) < 30000 and _state(d, "rendered") != before)
        width, center = float(_state(browser, "window-width")), float(_state(browser, "window-center"))
        assert center == 15000 and _state(browser, "origin") == f"{ox},{oy}", "a window drag does not pan"
        _wait(browser).until(lambda d: np.abs(_patch(d, x, y)[..., 0] - _windowed(
            expected[1000 : 1000 + PATCH, 900 : 900 + PATCH], center, width)).max() <= 1)  # fmt: skip
        canvas.send_keys("r")
        _wait(browser).until(lambda d: float(_state(d, "window-width")) == 30000)
        _wait(browser).until(lambda d: np.array_equal(_patch(d, x, y), grey))
        canvas.send_keys("+")  # zoom in about the canvas's middle, then drag to pan
        _wait(browser).until(lambda d: _state(d, "zoom") == "1.25")
        zoomed = _origin(browser)
        ActionChains(browser).click_and_hold(canvas).move_by_offset(40, 30).release().perform()
        _wait(browser).until(lambda d: _origin(d) != zoomed)
        panned = _origin(browser)
        moved = (panned[0] - zoomed[0], panned[1] - zoomed[1])
        assert moved == pytest.approx((40, 30)) and _state(browser, "zoom") == "1.25", "a plain drag pans"
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -300).perform()
        _wait(browser).until(lambda d: float(_state(d, "zoom")) > 1.25)  # the wheel zooms in
        right = ActionBuilder(browser)
        right.pointer_action.move_to(canvas).pointer_down(MouseButton.RIGHT).move_by(0, -50)
        right.pointer_action.pointer_up(MouseButton.RIGHT)
        right.perform()  # the right button drags the level (up: lower), the width stays
        _wait(browser).until(lambda d: float(_state(d, "window-center")) < 15000)
        assert float(_state(browser, "window-width")) == 30000

        shots = Path(os.environ.get("CXR_SCREENSHOT_DIR") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        browser.set_window_size(1500, 1250)
        canvas.send_keys("r")  # the DICOM's window
        canvas.send_keys("0")  # fit
        canvas.send_keys("h")
        _wait(browser).until(lambda d: float(_state(d, "window-center")) == 15000)
        _wait(browser).until(lambda d: _state(d, "heatmap") == "on" and d.find_element(By.ID, "heatmap-legend")
                             .is_displayed())  # fmt: skip
        browser.find_element(By.CSS_SELECTOR, "#heatmap-meaning summary").click()  # open the note on what the map means
        browser.execute_script("document.getElementById('viewer-heading').scrollIntoView()")
        browser.save_screenshot(str(shots / "viewer.png"))
        _after_retention(browser, harness, heatmap)
    assert (shots / "viewer.png").stat().st_size > 10_000
