"""Hostile files through the real listener, and fuzzing of the pixel pipeline and of the C-STORE handler.

The corpus is made here, each file sent as its bytes (never re-encoded by the sender) in the transfer syntax it
claims: one file per refusal class the worker has, and files with oversized dimensions, wrong or unknown VRs,
lying element lengths, deep sequences, transfer syntaxes that lie about the data, and UIDs made of path
characters. Each ends with a recorded reason (a refusal code and the attribute it names) or a precise DIMSE
failure status, nothing is written outside the spool, SR and thumbnail folders, and the listener still answers.

The fuzzers (hypothesis) check that ``preprocess.prepare_dataset`` of any small dataset gives a model input or a
refusal and never raises, and that the C-STORE handler answers every mutated dataset one of the listener's
statuses, after which the worker gives each accepted instance a result or a refusal, never an error. They run a
bounded number of examples in CI; ``CXR_FUZZ_EXAMPLES=N`` runs N of each (docs/RELIABILITY.md, Bad input).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import struct
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import chest_dataset, echo, send
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.dicom import listener
from cxr_triage.ml import preprocess
from cxr_triage.ml.preprocess import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    PreparedImage,
    Refusal,
    prepare_dataset,
)
from cxr_triage.ml.symmetry import REFUSAL_CODE as LATERAL_CODE

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="cxr-hypothesis-"))  # its caches, never in the repository
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EVIL = "cxr-evil-" + os.urandom(4).hex()
"""A name no file may ever get outside the product's folders (UIDs below try to write it into /tmp)."""
LISTENER_STATUSES = {
    listener.STATUS_SUCCESS,
    listener.STATUS_OUT_OF_RESOURCES,
    listener.STATUS_NOT_RECORDED,
    listener.STATUS_SOP_CLASS_MISMATCH,
    listener.STATUS_CANNOT_PARSE,
    listener.STATUS_MISSING_UIDS,
    listener.STATUS_INSTANCE_MISMATCH,
}
REFUSAL_CODES = set(re.findall(r'_refuse\(\s*"([a-z_]+)"', inspect.getsource(preprocess)))
"""Every refusal code of ``cxr_triage.ml.preprocess``, read from its source (a new one needs a case below)."""
ANY_REFUSAL_CODE = REFUSAL_CODES | {LATERAL_CODE}
"""What a fuzzed image may be refused with: those, or the pixel view check's (``cxr_triage.ml.symmetry``), which
judges any image whose header does not name the view (the corpus's cases name it; tests/test_symmetry.py covers it)."""
NOT_THROUGH_THE_LISTENER = {
    "sop_class": "a SOP class the listener has no presentation context for is never received",
    "unreadable": "a file that cannot be opened: spool files are written by the listener",
    "not_dicom": "the listener parses every header before it spools it",
}
"""Refusal codes no received instance can get, and why (the corpus covers every other one)."""


# --- writing files as bytes ----------------------------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian data element, its length field ``length`` (default: the value's)."""
    size = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack("<L", size) + value
    return head + struct.pack("<H", size) + value


def encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` (without file meta) encoded in ``syntax``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    uid = pydicom.uid.UID(syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = uid.is_little_endian, uid.is_implicit_VR
    write_dataset(buffer, Dataset(ds))
    return buffer.getvalue()


def part10_bytes(body: bytes, syntax: str, sop_class: str = CR_IMAGE_STORAGE, sop_uid: str = "") -> bytes:
    """A Part 10 file: file meta claiming ``syntax`` and ``sop_uid``, then ``body`` as the data set, as it is."""
    from pydicom.filebase import DicomBytesIO

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=False)
    return buffer.getvalue() + body


def part10(path: Path, body: bytes, syntax: str, sop_class: str = CR_IMAGE_STORAGE, sop_uid: str = "") -> Path:
    """``part10_bytes`` written to ``path``."""
    path.write_bytes(part10_bytes(body, syntax, sop_class, sop_uid))
    return path


# --- the corpus ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A hostile file and what must become of it: a refusal code, a listener status, or a result ("ok")."""

    name: str
    path: Path
    syntax: str
    sop_uid: str
    expect: str | int  # refusal code, DIMSE status, or "ok"
    attribute: str = ""  # the keyword a refusal's reason must name
    sop_class: str = CR_IMAGE_STORAGE


def _image(**attributes: object) -> Dataset:
    return chest_dataset(32, 32, seed=7, **attributes)


def _j2k(**attributes: object) -> Dataset:
    ds = _image(**attributes)
    ds.compress(JPEG2000Lossless)
    return ds


def _nested(depth: int) -> bytes:
    """A sequence nested ``depth`` deep, of undefined lengths (ReferencedImageSequence in each item)."""
    start = element(0x00081140, b"SQ", b"", 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return start * depth + end * depth


def _rle_that_panics() -> bytes:
    """The 32 x 32 test image's RLE codestream with one run header made a no-op (0x80): pylibjpeg-rle 2 then
    writes past its buffer and panics (a BaseException, which once killed the worker process). The first such
    position is looked for, so that a release without the bug still gets a corrupt stream here."""
    import rle.utils

    clean = bytearray(codestream(RLELossless))
    fallback = None
    for at in range(struct.unpack("<L", clean[8:12])[0], len(clean)):
        changed = bytes(clean[:at] + b"\x80" + clean[at + 1 :])
        try:
            rle.utils.decode_frame(changed, 32 * 32, 16, "<")
        except BaseException as exc:
            if type(exc).__name__ == "PanicException":
                return changed
            fallback = fallback or changed
    assert fallback is not None
    return fallback


def with_raw(ds: Dataset, extra: bytes, before: int = 0x7FE00010) -> bytes:
    """``ds`` encoded explicit VR LE, ``extra`` (raw elements) inserted in tag order before the tag ``before``."""
    head = Dataset({tag: ds[tag] for tag in sorted(ds.keys()) if tag < before})
    tail = Dataset({tag: ds[tag] for tag in sorted(ds.keys()) if tag >= before})
    return encoded(head) + extra + encoded(tail)


def corpus(folder: Path) -> list[Case]:
    """Every hostile file of the module docstring, written into ``folder``."""
    # One list, read top to bottom: each entry is a file and its fate; split, the corpus would be harder to audit.
    folder.mkdir()
    cases: list[Case] = []

    def add(name: str, body: bytes | Dataset, expect: str | int, attribute: str = "", **kw: str) -> None:
        syntax = kw.pop("syntax", ExplicitVRLittleEndian)
        sop_class = kw.pop("sop_class", CR_IMAGE_STORAGE)
        if isinstance(body, Dataset):
            sop_uid = kw.pop("sop_uid", str(body.get("SOPInstanceUID", "")))
            data = encoded(body, ExplicitVRLittleEndian if pydicom.uid.UID(syntax).is_compressed else syntax)
        else:
            sop_uid, data = kw.pop("sop_uid"), body
        path = part10(folder / f"{name}.dcm", data, syntax, sop_class, sop_uid)
        cases.append(Case(name, path, syntax, sop_uid, expect, attribute, sop_class))

    # Every refusal class a received instance can get.
    add("modality_mr", _image(Modality="MR"), "modality", "Modality")
    add("modality_missing", _image(Modality=None), "modality", "Modality")
    dx = {"SOPClassUID": DX_FOR_PROCESSING, "Modality": "DX", "PresentationIntentType": "FOR PROCESSING"}
    add("dx_for_processing", _image(**dx), "for_processing", "SOPClassUID", sop_class=DX_FOR_PROCESSING)
    intent = {"SOPClassUID": DX_FOR_PRESENTATION, "Modality": "DX", "PresentationIntentType": "FOR PROCESSING"}
    add(
        "intent_for_processing",
        _image(**intent),
        "for_processing",
        "PresentationIntentType",
        sop_class=DX_FOR_PRESENTATION,
    )
    add("not_chest", _image(BodyPartExamined="SKULL"), "not_chest", "BodyPartExamined")
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "69536005", "SCT", "Head"
    add(
        "not_chest_region",
        _image(BodyPartExamined=None, AnatomicRegionSequence=Sequence([region])),
        "not_chest",
        "AnatomicRegionSequence",
    )
    add("lateral", _image(ViewPosition="LL"), "not_frontal", "ViewPosition")
    add("no_pixels", _image(PixelData=None), "no_pixels", "PixelData")
    floats = _image(PixelData=None)
    floats.FloatPixelData = np.zeros(32 * 32, dtype="<f4").tobytes()
    add("float_pixels_only", floats, "no_pixels", "PixelData")
    rgb = _image(PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    rgb.PixelData = rgb.PixelData * 3
    add("rgb", rgb, "colour", "PhotometricInterpretation")
    add("three_samples_grey", _image(SamplesPerPixel=3), "colour", "SamplesPerPixel")
    frames = _image(NumberOfFrames=2)
    frames.PixelData = frames.PixelData * 2
    add("multiframe", frames, "multiframe", "NumberOfFrames")
    add("empty_rows", _image(Rows=0), "dimensions", "Rows")
    add("oversized_65535", _image(Rows=65535, Columns=65535), "dimensions", "Rows")
    add("oversized_8000", _image(Rows=8000, Columns=8000), "dimensions", "Rows")
    bomb = _j2k()
    fragments = pydicom.encaps.generate_fragments(bomb.PixelData)
    next(fragments)  # the Basic Offset Table
    fragment = bytearray(next(fragments))
    siz = fragment.find(b"\xff\x51")
    fragment[siz + 6 : siz + 14] = struct.pack(">2I", 60000, 60000)  # the codestream says 60000 x 60000
    bomb.PixelData = encapsulate([bytes(fragment)])
    add("j2k_bomb", bomb, "dimensions", "PixelData", syntax=JPEG2000Lossless)
    add("bits_32", _image(BitsAllocated=32, BitsStored=32, HighBit=31), "bit_depth", "BitsAllocated")
    add("bits_stored_17", _image(BitsStored=17, HighBit=16), "bit_depth", "BitsAllocated")
    short = _image()
    short.PixelData = short.PixelData[:100]
    add("truncated_native", short, "truncated", "PixelData")
    empty = _image()
    empty.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty Basic Offset Table item alone
    add("encapsulated_no_fragment", empty, "truncated", "PixelData", syntax=JPEG2000Lossless)
    add("slope_zero", _image(RescaleSlope=0, RescaleIntercept=0, RescaleType="US"), "voi", "RescaleSlope")
    add("window_width_zero", _image(WindowCenter=100, WindowWidth=0), "voi", "WindowWidth")
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0]
    lut.LUTData = bytes(2 * 4096)
    add("voi_lut_two_values", _image(VOILUTSequence=Sequence([lut])), "voi", "VOILUTSequence")
    garbage = _image()
    garbage.PixelData = encapsulate([np.random.default_rng(1).bytes(2000)])
    add("j2k_garbage", garbage, "undecodable", "PixelData", syntax=JPEG2000Lossless)
    add("rle_garbage", garbage, "undecodable", "PixelData", syntax=RLELossless)
    panic = _image()
    panic.PixelData = encapsulate([_rle_that_panics()])
    add("rle_decoder_panic", panic, "undecodable", "PixelData", syntax=RLELossless)

    # What the listener itself refuses, with its status.
    # Random bytes parse as a few odd elements: no UIDs.
    add("not_a_dataset", np.random.default_rng(2).bytes(3000), listener.STATUS_MISSING_UIDS, sop_uid=generate_uid())
    add("ct_on_cr_context", _image(SOPClassUID=CT_IMAGE_STORAGE), listener.STATUS_SOP_CLASS_MISMATCH)
    add("no_study_uid", _image(StudyInstanceUID=None), listener.STATUS_MISSING_UIDS)
    other = _image()
    add("affected_uid_mismatch", other, listener.STATUS_INSTANCE_MISMATCH, sop_uid=generate_uid())

    # Wrong, unknown and lying VRs and lengths.
    plain = _image()
    rows = element(0x00280010, b"US", b"\x20\x00\x00")  # Rows, 3 bytes
    add(
        "us_of_three_bytes",
        with_raw(without(plain, "Rows"), rows, 0x00280011),
        listener.STATUS_CANNOT_PARSE,
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    rows = element(0x00280010, b"DS", b"32")  # Rows as a decimal string
    add("rows_as_text", with_raw(without(plain, "Rows"), rows, 0x00280011), "ok", sop_uid=str(plain.SOPInstanceUID))
    # Values a header can hold where one integer belongs: the worker refuses them, naming the attribute.
    plain = _image()
    rows = element(0x00280010, b"US", b"\x20\x00\x20\x00")  # Rows, 4 bytes: two values
    add(
        "rows_two_values",
        with_raw(without(plain, "Rows"), rows, 0x00280011),
        "dimensions",
        "Rows",
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    frames = element(0x00280008, b"IS", b"abc ")
    add(
        "frames_not_a_number",
        with_raw(plain, frames, 0x00280009),
        "multiframe",
        "NumberOfFrames",
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    name = element(0x00100010, b"ZZ", b"EVIL^VR ")  # PatientName with a VR that does not exist
    add(
        "unknown_vr",
        with_raw(without(plain, "PatientName"), name, 0x00100020),
        listener.STATUS_CANNOT_PARSE,
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    # A length running past the end swallows the elements after it, the Study Instance UID among them.
    lying = element(0x00081030, b"LO", b"CHEST", 0xFFF0)  # Study Description says 65520 bytes, holds 5
    add(
        "lying_short_length",
        with_raw(plain, lying, 0x00081031),
        listener.STATUS_MISSING_UIDS,
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    huge = element(0x00091010, b"OB", b"\0" * 16, 0xFFFFFFF0)  # a private OB value announcing 4 GiB
    add(
        "lying_4gib_length",
        with_raw(plain, huge, 0x00091011),
        listener.STATUS_MISSING_UIDS,
        sop_uid=str(plain.SOPInstanceUID),
    )

    # Deep sequences.
    for depth, fate in ((100, "ok"), (20000, listener.STATUS_CANNOT_PARSE)):
        plain = _image()
        add(
            f"sequence_{depth}_deep",
            with_raw(plain, _nested(depth), 0x00081141),
            fate,
            sop_uid=str(plain.SOPInstanceUID),
        )

    # Transfer syntaxes that lie about the data.
    add("native_claimed_j2k", _image(), "truncated", "PixelData", syntax=JPEG2000Lossless)  # pixels not encapsulated
    plain = _image()
    # pydicom sees explicit VRs where implicit ones were claimed (and the reverse) and reads them as they are.
    add(
        "explicit_claimed_implicit",
        encoded(plain),
        "ok",
        syntax=ImplicitVRLittleEndian,
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    add("implicit_claimed_explicit", encoded(plain, ImplicitVRLittleEndian), "ok", sop_uid=str(plain.SOPInstanceUID))
    plain = _image()
    add(
        "little_claimed_big",
        encoded(plain),
        listener.STATUS_MISSING_UIDS,
        syntax=ExplicitVRBigEndian,
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    add(
        "plain_claimed_deflate",
        encoded(plain),
        listener.STATUS_CANNOT_PARSE,
        syntax=DeflatedExplicitVRLittleEndian,
        sop_uid=str(plain.SOPInstanceUID),
    )
    plain = _image()
    add(
        "deflate_of_garbage",
        zlib.compress(b"\xff" * 4000)[2:-4],
        listener.STATUS_MISSING_UIDS,
        syntax=DeflatedExplicitVRLittleEndian,
        sop_uid=str(plain.SOPInstanceUID),
    )
    add("j2k_claimed_rle", _j2k(), "undecodable", "PixelData", syntax=RLELossless)

    # UIDs made of path characters, and UIDs too long to be UIDs.
    for label, uid in (
        ("sop_dotdot", f"../../../../../../tmp/{EVIL}"),
        ("sop_absolute", f"/tmp/{EVIL}"),
        ("sop_nul", f"1.2.3\0/../../../tmp/{EVIL}"),
    ):
        add(label, _image(SOPInstanceUID=uid), listener.STATUS_MISSING_UIDS, sop_uid=uid)
    add("study_dotdot", _image(StudyInstanceUID=f"1.2/../../../../../tmp/{EVIL}"), listener.STATUS_MISSING_UIDS)
    add("study_65_digits", _image(StudyInstanceUID="1." + "2" * 63), listener.STATUS_MISSING_UIDS)
    add("series_dotdot", _image(SeriesInstanceUID=f"../../../../../tmp/{EVIL}"), "ok")
    add("accession_dotdot", _image(AccessionNumber=f"../../{EVIL}"), "ok")
    return cases


def without(ds: Dataset, keyword: str) -> Dataset:
    del ds[keyword]
    return ds


def _new_files(root: Path, allowed: list[Path]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(a in p.parents for a in allowed))


def test_every_hostile_file_ends_with_a_reason_and_nothing_outside_the_spool(make_harness, tmp_path: Path) -> None:
    harness = make_harness()
    cases = corpus(tmp_path / "corpus")
    reachable = REFUSAL_CODES - set(NOT_THROUGH_THE_LISTENER)
    assert {c.expect for c in cases if isinstance(c.expect, str)} - {"ok"} == reachable, "one case per class"
    statuses = {}
    for case in cases:
        (statuses[case.name],) = send(harness.port, [case.path], contexts=[(case.sop_class, case.syntax)], raw=True)
    assert echo(harness.port) == 0, "the listener survived the corpus"
    harness.work()
    with harness.sessions() as session:
        instances = {i.sop_instance_uid: i for i in session.scalars(select(db.Instance))}
        refusals = {r.instance_id: r for r in session.scalars(select(db.RefusalRecord))}
    found: dict[str, object] = {}
    for case in cases:
        row = instances.get(case.sop_uid.strip())
        if statuses[case.name] != 0:
            found[case.name] = statuses[case.name]
            assert row is None, f"{case.name}: refused with 0x{statuses[case.name]:04X} but recorded"
        elif row is None:
            found[case.name] = "accepted, not recorded"
        elif row.status == db.REFUSED:
            refusal = refusals[row.id]
            found[case.name] = refusal.code
            if case.expect == refusal.code:
                assert case.attribute in refusal.reason, (case.name, refusal.reason)
        else:
            found[case.name] = "ok" if row.status == db.DONE else f"{row.status}: {row.last_error}"
    wrong = {c.name: (found[c.name], "expected", c.expect) for c in cases if found[c.name] != c.expect}
    assert wrong == {}
    spool, sr = harness.settings.storage.spool_dir, harness.settings.storage.sr_dir
    models = getattr(harness.settings.model, "models_dir", None)  # the model registry, where the release has one
    heatmaps = harness.settings.heatmap.folder(harness.settings.storage)  # the worker's maps
    folders = [spool, sr, harness.settings.storage.thumbnail_dir, heatmaps, tmp_path / "corpus"]
    folders += [models] if models else []
    allowed = [Path(p).resolve() for p in folders]
    assert _new_files(harness.tmp.resolve(), [*allowed, (harness.tmp / "db").resolve()]) == []
    assert not list(Path("/tmp").glob(f"{EVIL}*")) and not list(Path("/").glob(f"{EVIL}*"))


def test_an_a_abort_in_the_middle_of_a_dataset_leaves_nothing_behind(make_harness) -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF
    from test_hostile_peers import associated, wait_closed

    harness = make_harness()
    ds = chest_dataset(256, 256, seed=3)
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 1, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = CR_IMAGE_STORAGE, ds.SOPInstanceUID
    primitive.DataSet = BytesIO(encoded(ds, ImplicitVRLittleEndian))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for data in message.encode_msg(3, 16384):  # context 3: CR Image Storage, implicit VR (the raw request's)
        pdu = P_DATA_TF()
        pdu.from_primitive(data)
        pdus.append(pdu.encode())
    assert len(pdus) > 4
    sock = associated(harness.port)
    for pdu in pdus[: len(pdus) // 2]:  # the command and half the data set
        sock.sendall(pdu)
    sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT, from the service user
    seconds, _ = wait_closed(sock, 30)
    sock.close()
    assert seconds < 10
    assert echo(harness.port) == 0
    spool = Path(harness.settings.storage.spool_dir)
    assert harness.rows() == [] and not [p for p in spool.rglob("*") if p.is_file()], "nothing kept of it"
    assert harness.send([ds]) == [0], "sent again whole, it is taken"
    assert harness.work() == 1 and [r["status"] for r in harness.rows()] == ["ok"]


# --- fuzzing -------------------------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES") or 0)
"""Examples per fuzzer: ``CXR_FUZZ_EXAMPLES`` when set, else the CI budgets below (a few seconds each)."""
SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
]
UNSET = object()


def _fuzz_settings(ci_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        database=None,  # nothing written into the repository
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


_numbers = st.one_of(
    st.integers(-3, 70000), st.sampled_from([0, 1, 8, 12, 16, 32]), st.text(max_size=6), st.lists(st.integers(0, 99))
)
_reals = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e-30]), st.text(max_size=6)
)
_FUZZED = {
    "Rows": _numbers,
    "Columns": _numbers,
    "BitsAllocated": st.one_of(st.sampled_from([8, 16]), _numbers),
    "BitsStored": st.one_of(st.sampled_from([1, 8, 12, 16]), _numbers),
    "HighBit": _numbers,
    "PixelRepresentation": st.one_of(st.sampled_from([0, 1]), _numbers),
    "SamplesPerPixel": st.one_of(st.just(1), _numbers),
    "NumberOfFrames": st.one_of(st.just("1"), _numbers),
    "PhotometricInterpretation": st.one_of(
        st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", ""]), st.text(max_size=8)
    ),
    "RescaleSlope": _reals,
    "RescaleIntercept": _reals,
    "WindowCenter": st.one_of(_reals, st.lists(_reals, max_size=3)),
    "WindowWidth": st.one_of(_reals, st.lists(_reals, max_size=3)),
    "VOILUTFunction": st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "", "BOGUS"]),
    "PresentationLUTShape": st.sampled_from(["IDENTITY", "INVERSE", "", "BOGUS"]),
    "Modality": st.sampled_from(["CR", "DX", "CT", ""]),
    "ViewPosition": st.sampled_from(["PA", "AP", "LL", ""]),
}
"""The attributes the pixel pipeline reads, and what a hostile header may hold in them (written as bytes)."""


def raw_value(vr: str, value: object) -> bytes:
    """``value`` as the bytes of a value of ``vr``, whatever it is: numbers in range as binary, anything else as
    the text or bytes a peer could send (odd lengths padded, as the standard requires)."""
    if isinstance(value, list):
        if vr in ("US", "SS"):
            data = b"".join(struct.pack("<H", v & 0xFFFF) for v in value)
        else:
            data = "\\".join(str(v) for v in value).encode()
    elif vr in ("US", "SS") and isinstance(value, int):
        data = struct.pack("<H", value & 0xFFFF) if 0 <= value < 2**16 else struct.pack("<l", value)
    else:
        data = str(value).encode()
    return data + b" " * (len(data) % 2)


_CODESTREAMS: dict[str, bytes] = {}


def codestream(syntax: str) -> bytes:
    """The one fragment of the 32 x 32 test image compressed in ``syntax`` (made once)."""
    if syntax not in _CODESTREAMS:
        ds = chest_dataset(32, 32, seed=0)
        ds.compress(syntax)
        fragments = pydicom.encaps.generate_fragments(ds.PixelData)
        next(fragments)  # the Basic Offset Table
        _CODESTREAMS[syntax] = next(fragments)
    return _CODESTREAMS[syntax]


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, str]:
    """A small image data set (explicit VR LE bytes) and the transfer syntax claimed for it. Any pixel-related
    attribute may be absent, odd, huge, of the wrong length or not a number (each in about one data set in
    six, so that many reach the decoder), with native or encapsulated pixel data of any size: random bytes, or
    a real RLE or JPEG 2000 codestream of the image with some of its bytes flipped."""
    claim = draw(st.sampled_from([ExplicitVRLittleEndian] * len(SYNTAXES) + SYNTAXES))
    rows, cols = draw(st.sampled_from([32, 32, 32, 0, 1, 7, 40]) | st.integers(0, 40)), 32
    ds = chest_dataset(32, 32, seed=0)
    ds.Rows, ds.Columns = rows, cols
    raw: dict[int, bytes] = {}
    for keyword, strategy in _FUZZED.items():
        if draw(st.integers(0, 5)):
            continue
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if keyword in ds:
            del ds[keyword]
        value = draw(st.one_of(st.none(), strategy))
        if value is not None:
            vr = pydicom.datadict.dictionary_VR(tag)
            raw[tag] = element(tag, vr.encode(), raw_value(vr, value))
    for keyword in ("VOILUTSequence", "ModalityLUTSequence"):
        if draw(st.integers(0, 5)) == 0:
            item = Dataset()
            item.add_new("LUTDescriptor", "US", draw(st.lists(st.integers(0, 65535), max_size=4)))
            item.add_new("LUTData", "OW", draw(st.binary(max_size=64).map(lambda b: b + b"\0" * (len(b) % 2))))
            setattr(ds, keyword, Sequence([item]))
    native = ds.PixelData
    del ds.PixelData
    kind = draw(st.sampled_from(["native", "native", "random", "rle", "j2k"]))
    if kind == "native":
        data = native[: draw(st.sampled_from([len(native), len(native), 0, 1, 100]))]
    elif kind == "random":
        size = draw(st.sampled_from([1, 2 * rows * cols, 3000]))
        data = np.random.default_rng(size).bytes(size)
    else:
        stream = bytearray(codestream(RLELossless if kind == "rle" else JPEG2000Lossless))
        for where, value in draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3)):
            stream[int(where * (len(stream) - 1))] = value
        data = bytes(stream)
    data += b"\0" * (len(data) % 2)
    if data and (kind in ("rle", "j2k") or draw(st.booleans())):
        items = encapsulate([data]) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        pixels = element(0x7FE00010, b"OB", items, 0xFFFFFFFF)
    else:
        pixels = element(0x7FE00010, b"OW", data)
    elements = {int(tag): encoded(Dataset({tag: ds[tag]})) for tag in sorted(ds.keys())}
    elements.update(raw)
    if kind in ("rle", "j2k") and draw(st.integers(0, 3)):  # mostly claimed as what it is
        claim = RLELossless if kind == "rle" else JPEG2000Lossless
    return b"".join(elements[tag] for tag in sorted(elements)) + pixels, claim


@pytest.mark.filterwarnings("ignore")  # pydicom warns of every invalid value the strategy makes on purpose
def test_the_pixel_pipeline_refuses_or_prepares_any_small_dataset(caplog) -> None:
    from io import BytesIO

    from cxr_triage.ml.preprocess import read_dicom

    caplog.set_level(logging.ERROR, logger="pydicom")

    outcomes: Counter[str] = Counter()

    @_fuzz_settings(400)
    @given(headers())
    def check(header: tuple[bytes, str]) -> None:
        body, claim = header
        buffer = BytesIO()  # the spool file the worker reads: file meta claiming ``claim``, then the body
        buffer.write(part10_bytes(body, claim))
        buffer.seek(0)
        read = read_dicom(buffer)
        result = read if isinstance(read, Refusal) else prepare_dataset(read)
        if isinstance(result, Refusal):
            assert result.code in ANY_REFUSAL_CODE and result.reason, result
            outcomes[result.code] += 1
        else:
            assert isinstance(result, PreparedImage)
            assert tuple(result.tensor.shape) == (3, 224, 224) and bool(torch.isfinite(result.tensor).all())
            assert float(result.tensor.min()) >= 0.0 and float(result.tensor.max()) <= 1.0
            outcomes["prepared"] += 1

    check()
    print(f"pixel pipeline fuzz: {sum(outcomes.values())} datasets, {dict(outcomes.most_common())}")
    assert outcomes["prepared"] and len(outcomes) > 5, outcomes


_MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "flip", "flip", "insert", "length", "cut"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def mutate(body: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    """Apply each mutation at its relative position: a flipped byte, inserted bytes, a 4-byte overwrite (a
    length field, or anything else, set to a large or odd value), or a cut in the last third (the pixel data)."""
    data = bytearray(body)
    for kind, where, value in mutations:
        at = int(where * max(0, len(data) - 1))
        if kind == "flip" and data:
            data[at] ^= value[0] or 0xFF
        elif kind == "cut":
            del data[int((2 + where) / 3 * len(data)) :]
        elif kind == "insert":
            data[at:at] = value
        else:
            data[at : at + 4] = (value * 4)[:4]
    return bytes(data)


class Sender:
    """One association kept open across examples (a new one if the listener ended it), files sent as bytes."""

    def __init__(self, port: int, syntaxes: list[str]) -> None:
        from pynetdicom import AE, build_context

        self.port = port
        self.ae = AE(ae_title="FUZZER")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 20
        self.ae.requested_contexts = [build_context(CR_IMAGE_STORAGE, [syntax]) for syntax in syntaxes]
        self.assoc = None

    def send(self, path: Path) -> int | None:
        from pynetdicom import _config

        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="CXR_TRIAGE")
            assert self.assoc.is_established
        chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            response = self.assoc.send_c_store(str(path))
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked
        return int(response.Status) if "Status" in response else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


@pytest.mark.filterwarnings("ignore")
def test_the_c_store_handler_answers_every_mutated_dataset_and_the_worker_ends_each(
    make_harness, tmp_path: Path, caplog
) -> None:
    harness = make_harness()
    caplog.set_level(logging.ERROR, logger="pynetdicom")
    caplog.set_level(logging.ERROR, logger="pydicom")
    answered: Counter[int] = Counter()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    sender = Sender(harness.port, SYNTAXES)

    @_fuzz_settings(120)
    @given(
        st.integers(0, 2**16),
        st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]),
        st.one_of(st.none(), st.sampled_from(SYNTAXES)),
        _MUTATIONS,
    )
    def check(seed: int, encoding: str, claim: str | None, mutations: list[tuple[str, float, bytes]]) -> None:
        ds = chest_dataset(16, 16, seed=seed)
        if encoding == RLELossless:
            ds.compress(RLELossless)
        body = mutate(encoded(ds, ExplicitVRLittleEndian if encoding == RLELossless else encoding), mutations)
        claimed = claim or encoding  # half the time what it is, else any syntax
        path = part10(folder / f"{len(answered)}.dcm", body, claimed, sop_uid=str(ds.SOPInstanceUID))
        status = sender.send(path)
        assert status in LISTENER_STATUSES, f"status {status!r}"
        answered[status] += 1

    try:
        check()
    finally:
        sender.close()
    assert echo(harness.port) == 0
    assert not [r for r in caplog.records if "Exception in the handler" in r.getMessage()]
    harness.work()
    with harness.sessions() as session:
        ended = Counter(i.status for i in session.scalars(select(db.Instance)))
        codes = Counter(r.code for r in session.scalars(select(db.RefusalRecord)))
    print(
        f"C-STORE fuzz: {sum(answered.values())} mutated datasets, statuses "
        f"{ {f'0x{k:04X}': n for k, n in answered.items()} }; the worker: {dict(ended)}, refusals {dict(codes)}"
    )
    assert set(ended) <= {db.DONE, db.REFUSED}, ended
    assert sum(ended.values()) >= answered[0] > 0 and set(codes) <= ANY_REFUSAL_CODE
