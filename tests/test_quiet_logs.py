"""Quiet, honest logs (issue 30): a normal first start of ``cxr-triage serve`` (an empty database, one worker that
warms up) logs no WARNING and no result it did not produce; a malformed dataset gives one log record with the
count of pydicom's warnings and nothing else, no ``UserWarning`` on standard error (the server's standard error is
in its log file)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import chest_dataset, config_values, write_config
from pydicom.dataelem import DataElement

from cxr_triage.testing.peers import Server, storescu, wait_until

pytestmark = pytest.mark.xdist_group("quiet_logs")  # one worker: one `serve` for the module

RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) ")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("quiet")
    values = config_values(tmp, tiny_model, worker={"processes": 1})
    config = write_config(tmp / "cxr.toml", values)
    with Server(config, int(values["listener"]["port"]), ready_timeout=180) as running:
        wait_until(lambda: "ready: model" in running.log.read_text(errors="replace"), 180, "the worker's warm-up")
        yield running


def levels(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := RECORD.match(line))]


def test_a_first_start_logs_no_warning_and_no_result(server: Server) -> None:
    text = server.log.read_text(errors="replace")
    assert "has no tables: creating the schema" in text, text  # said, at INFO
    assert "WARNING" not in levels(text) and "ERROR" not in levels(text), text
    assert "built triage SR" not in text, "the warm-up's template builds were logged as results"
    assert all(RECORD.match(line) for line in text.splitlines() if line.strip()), text  # nothing outside a record


def malformed(path: Path) -> Path:
    """A chest CR whose header holds invalid values: an integer string, a code string and a long string over their
    limits (pydicom warns about each, some twice)."""
    ds = chest_dataset(seed=7)
    with pydicom.config.disable_value_validation():
        ds.add(DataElement(0x00200013, "IS", "1.5"))  # InstanceNumber
        ds.add(DataElement(0x00080064, "CS", "toolongvaluexxxxxxxxx"))  # ConversionType
        ds.add(DataElement(0x00181030, "LO", "x" * 70))  # ProtocolName over 64 characters
        ds.save_as(path, enforce_file_format=True)
    return path


def test_a_malformed_dataset_gives_one_record_and_nothing_on_stderr(server: Server, tmp_path: Path) -> None:
    path = malformed(tmp_path / "malformed.dcm")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    mark = len(server.log.read_bytes())
    storescu(server.port, [path], timeout=120)

    def since() -> str:
        return server.log.read_bytes()[mark:].decode(errors="replace")

    outcome = re.compile(rf"SOP instance {re.escape(uid)}(: \w+ \(model | refused: )")
    wait_until(lambda: outcome.search(since()), 180, "the worker's outcome")
    text = since()
    said = [line for line in text.splitlines() if "pydicom warned" in line]
    assert len(said) == 1, text
    count = re.search(r"pydicom warned (\d+) times about its dataset", said[0])
    assert count and int(count.group(1)) >= 2, said
    assert "UserWarning" not in text and "warn_and_log" not in text, text
    assert "Invalid value for VR" not in text.replace(said[0], ""), text
    assert all(RECORD.match(line) for line in text.splitlines() if line.strip()), text
