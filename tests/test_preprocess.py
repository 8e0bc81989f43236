"""The pixel pipeline: real chest files, one picture in every encoding, and every refusal.

The encodings are written by real encoders (pydicom + pylibjpeg-openjpeg, dcmtk's dcmcjpls, dcmcrle, dcmcjpeg and
dcmconv); the reference for each is the picture a correct viewer shows, computed by ``tests/dicom_factory.py``
from the same display image, so every assertion compares against an independent right answer.
"""

from __future__ import annotations

import io
import itertools
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from cxr_triage.ml import preprocess
from cxr_triage.ml.imaging import IMAGE_SIZE, to_model_input
from cxr_triage.ml.preprocess import (
    PreparedImage,
    Refusal,
    check_header,
    codestream_size,
    grey_lut,
    prepare_dataset,
    prepare_path,
    read_dicom,
)

pytestmark = pytest.mark.xdist_group("preprocess")  # one worker: the encoded variants built once

ONE_LEVEL = 1.0 / 255.0
"""One 8-bit grey level: the tolerance allowed between encodings of the same image."""

LOSSY_MAX = 2.0 / 255.0
LOSSY_MEAN = 0.5 / 255.0
"""RG1's JPEG 2000 lossy encoding against the uncompressed original, after resizing to 224x224: at most two grey
levels anywhere and half a level on average (measured: 0.20 and 0.04 levels)."""

REAL_FILES = sorted(p.name for p in factory.SHARED_DICOM.glob("*.dcm"))
MONOCHROME1_FILES = ("pydicom-data_RG1_UNCR.dcm", "fo-dicom_CR-MONO1-10-chest.dcm")

EXPECTED_SYNTAX = {
    "mono2_12bit": ExplicitVRLittleEndian,
    "rescale_16bit": ExplicitVRLittleEndian,
    "mono1_window": ExplicitVRLittleEndian,
    "mono1_no_window": ExplicitVRLittleEndian,
    "implicit_8bit": ImplicitVRLittleEndian,
    "signed_12bit": ExplicitVRLittleEndian,
    "voi_lut_12bit": ExplicitVRLittleEndian,
    "j2k_lossless_pydicom": JPEG2000Lossless,
    "rle_pydicom": RLELossless,
    "jpegls_dcmcjpls": JPEGLSLossless,
    "jpegls_dcmcjpls_rescale": JPEGLSLossless,
    "rle_dcmcrle": RLELossless,
    "jpeg_lossless_dcmcjpeg": JPEGLosslessSV1,
    "deflate_dcmconv": DeflatedExplicitVRLittleEndian,
    "big_endian_dcmconv": ExplicitVRBigEndian,
    "no_file_meta": None,
}


def tensor_of(result: PreparedImage | Refusal) -> torch.Tensor:
    assert isinstance(result, PreparedImage), f"refused: {result}"
    return result.tensor


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def reference(display: np.ndarray) -> torch.Tensor:
    """What the model must receive for a picture displayed as ``display``."""
    return to_model_input(display.astype(np.float32))


def assert_refused(result: PreparedImage | Refusal, code: str, attribute: str | None, *words: str) -> None:
    assert isinstance(result, Refusal), f"expected a {code} refusal, got a tensor"
    assert (result.code, result.attribute) == (code, attribute), result
    if attribute is not None:
        assert attribute in result.reason
    for word in words:
        assert word in result.reason, f"{word!r} not in {result.reason!r}"


@pytest.fixture(scope="module")
def display() -> np.ndarray:
    return factory.phantom()


@pytest.fixture(scope="module")
def real() -> dict[str, PreparedImage | Refusal]:
    return {name: prepare_path(factory.SHARED_DICOM / name) for name in REAL_FILES}


@pytest.fixture(scope="module")
def variants(display: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("variants")
    return {name: factory.encode(display, name, folder) for name in factory.VARIANTS}


@pytest.fixture(scope="module")
def variant_tensors(variants: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {name: tensor_of(prepare_path(path)) for name, path in variants.items()}


# --- real files ------------------------------------------------------------------------------------------------


def test_the_five_real_files_are_there() -> None:
    assert len(REAL_FILES) == 5, REAL_FILES


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_gives_model_tensor(name: str, real: dict[str, PreparedImage | Refusal]) -> None:
    result = real[name]
    t = tensor_of(result)
    assert t.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert float(t.std()) > 0.05, "an image, not a flat field"
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2])
    ds = pydicom.dcmread(factory.SHARED_DICOM / name, force=True, stop_before_pixels=True)
    assert result.sop_instance_uid == ds.SOPInstanceUID


def test_rg1_lossless_encodings_are_identical(real: dict[str, PreparedImage | Refusal]) -> None:
    assert torch.equal(tensor_of(real["pydicom-data_RG1_UNCR.dcm"]), tensor_of(real["pydicom-data_RG1_J2KR.dcm"]))


def test_rg1_lossy_jpeg2000_is_close(real: dict[str, PreparedImage | Refusal]) -> None:
    diff = (tensor_of(real["pydicom-data_RG1_UNCR.dcm"]) - tensor_of(real["pydicom-data_RG1_J2KI.dcm"])).abs()
    assert float(diff.max()) <= LOSSY_MAX
    assert float(diff.mean()) <= LOSSY_MEAN
    assert float(diff.max()) > 0.0, "the lossy file decodes to different pixels; equality would mean it was not read"


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_chest_has_dark_lungs(name: str, real: dict[str, PreparedImage | Refusal]) -> None:
    """Lungs (air) are dark and the mediastinum and spine bright on every correctly displayed chest film."""
    lungs, mediastinum = factory.lung_and_mediastinum(tensor_of(real[name])[0].numpy())
    assert mediastinum - lungs > 0.15, (lungs, mediastinum)


@pytest.mark.parametrize("name", MONOCHROME1_FILES)
def test_monochrome1_files_are_stored_bright_lungs(name: str) -> None:
    """The other half of the dark-lungs check: these files store the lungs as *high* values, so the tensor's
    dark lungs prove the inversion happened (and happened once)."""
    ds = read_dicom(factory.SHARED_DICOM / name)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    lungs, mediastinum = factory.lung_and_mediastinum(ds.pixel_array.astype(np.float64))
    assert lungs > mediastinum


def test_file_without_meta_header_is_read_as_implicit_vr() -> None:
    path = factory.SHARED_DICOM / "fo-dicom_CR-MONO1-10-chest.dcm"
    assert path.read_bytes()[128:132] != b"DICM"
    ds = read_dicom(path)
    assert isinstance(ds, Dataset)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


# --- one picture, every encoding --------------------------------------------------------------------------------


def test_phantom_looks_like_a_chest(display: np.ndarray) -> None:
    lungs, mediastinum = factory.lung_and_mediastinum(display)
    assert mediastinum - lungs > 0.3
    assert np.array_equal(display, np.round(display * 255) / 255)


@pytest.mark.parametrize("variant", factory.VARIANTS)
def test_encoding_is_what_it_claims(variant: str, variants: dict[str, Path]) -> None:
    ds = pydicom.dcmread(variants[variant], force=True)
    assert ds.file_meta.get("TransferSyntaxUID") == EXPECTED_SYNTAX[variant]
    if variant == "no_file_meta":
        assert variants[variant].read_bytes()[128:132] != b"DICM"


@pytest.mark.parametrize("variant", factory.VARIANTS)
def test_encoding_gives_the_displayed_picture(
    variant: str, display: np.ndarray, variant_tensors: dict[str, torch.Tensor]
) -> None:
    """Each encoding within half a grey level of the picture: so any two are within one level of each other."""
    assert max_diff(variant_tensors[variant], reference(display)) <= ONE_LEVEL / 2


def test_all_encodings_agree_pairwise(variant_tensors: dict[str, torch.Tensor]) -> None:
    images = {name: t.numpy() for name, t in variant_tensors.items()}
    worst = max(
        (float(np.abs(images[a] - images[b]).max()), a, b) for a, b in itertools.combinations(sorted(images), 2)
    )
    assert worst[0] <= ONE_LEVEL, worst
    assert len(images) >= 12


def test_dicom_and_png_doors_give_identical_tensors(
    display: np.ndarray, variant_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Training images (8-bit PNG/JPEG) and DICOM meet at step 6: the same 8-bit picture is the same tensor."""
    png = tmp_path / "phantom.png"
    Image.fromarray(np.round(display * 255).astype(np.uint8), mode="L").save(png)
    assert torch.equal(tensor_of(prepare_path(png)), variant_tensors["implicit_8bit"])


def test_monochrome1_equals_inverted_monochrome2(display: np.ndarray) -> None:
    """The MONOCHROME1 trap: pydicom's presentation step ignores PhotometricInterpretation."""
    stored = np.round(display * 4095).astype(np.uint16)
    mono2 = factory.new_dataset(stored, bits_stored=12)
    mono1 = factory.new_dataset(4095 - stored, bits_stored=12, photometric="MONOCHROME1")
    assert max_diff(tensor_of(prepare_dataset(mono1)), tensor_of(prepare_dataset(mono2))) <= 1e-6

    # With a window: (c, w) on MONOCHROME2 is (4095 - c + 1, w) on the inverted MONOCHROME1 data.
    c, w = 1800.0, 2500.0
    mono2w = factory.new_dataset(stored, bits_stored=12, WindowCenter=c, WindowWidth=w)
    mono1w = factory.new_dataset(
        4095 - stored, bits_stored=12, photometric="MONOCHROME1", WindowCenter=4095 - c + 1, WindowWidth=w
    )
    a, b = tensor_of(prepare_dataset(mono1w)), tensor_of(prepare_dataset(mono2w))
    assert max_diff(a, b) <= 1e-5
    assert max_diff(a, reference(display)) > 0.05, "the window must actually change the picture"


def test_monochrome1_inverts_against_the_stored_range_not_the_data_max() -> None:
    """A MONOCHROME1 image using only part of its 12 bits keeps its grey levels: 1 - x / 4095, not 1 - x / max."""
    stored = np.tile(np.linspace(1000, 3000, 64).round().astype(np.uint16), (64, 1))
    result = tensor_of(prepare_dataset(factory.new_dataset(stored, bits_stored=12, photometric="MONOCHROME1")))
    assert max_diff(result, reference(1.0 - stored / 4095.0)) <= 1e-6


def test_presentation_lut_shape(display: np.ndarray) -> None:
    stored = np.round(display * 4095).astype(np.uint16)
    plain = tensor_of(prepare_dataset(factory.new_dataset(stored, bits_stored=12)))
    inverse2 = factory.new_dataset(stored, bits_stored=12, PresentationLUTShape="INVERSE")
    assert max_diff(tensor_of(prepare_dataset(inverse2)), 1.0 - plain) <= 1e-6
    # DX requires INVERSE with MONOCHROME1: the two say the same thing once, not twice.
    inverse1 = factory.new_dataset(4095 - stored, bits_stored=12, photometric="MONOCHROME1")
    inverse1.PresentationLUTShape = "INVERSE"
    assert max_diff(tensor_of(prepare_dataset(inverse1)), plain) <= 1e-6


def test_voi_lut_sequence_is_honoured(display: np.ndarray, variants: dict[str, Path]) -> None:
    ds = read_dicom(variants["voi_lut_12bit"])
    assert "VOILUTSequence" in ds and "WindowCenter" not in ds
    result = tensor_of(prepare_dataset(ds))
    assert max_diff(result, reference(display)) <= ONE_LEVEL / 2
    del ds.VOILUTSequence
    ignored = tensor_of(prepare_dataset(ds))
    assert max_diff(ignored, reference(display)) > 0.1, "without its LUT the picture is different"


def test_voi_lut_input_beyond_16_bits_does_not_wrap() -> None:
    """A rescale can push values past 65535; they must map to the LUT's last entry, not wrap around to dark.
    (pydicom's apply_voi indexes through uint16, so 65636 would become 100: one reason the pipeline owns this.)"""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", list(range(4096)))
    stored = np.array([[50, 1000], [2047, 32818]], dtype=np.uint16)  # 32818 * 2 = 65636
    ds = factory.new_dataset(stored, bits_stored=16, RescaleSlope=2, RescaleIntercept=0)
    ds.VOILUTSequence = Sequence([item])
    lut, _ = grey_lut(ds)
    assert lut[32818] == 1.0
    assert lut[50] == pytest.approx(100 / 4095)
    assert lut[1000] == pytest.approx(2000 / 4095)


def test_signed_pixels_with_a_window(display: np.ndarray) -> None:
    stored = np.round(factory.window_input(display, 0.0, 4000.0)).astype(np.int16)
    assert stored.min() < -500 and stored.max() > 1000
    ds = factory.new_dataset(stored, bits_stored=16, signed=True, WindowCenter=0.0, WindowWidth=4000.0)
    assert max_diff(tensor_of(prepare_dataset(ds)), reference(display)) <= ONE_LEVEL / 2


def test_bits_above_bits_stored_are_ignored(display: np.ndarray) -> None:
    stored = np.round(display * 4095).astype(np.uint16)
    clean = factory.new_dataset(stored, bits_stored=12)
    dirty = factory.new_dataset(stored, bits_stored=12)
    dirty.PixelData = (stored | 0xA000).astype("<u2").tobytes()  # overlay bits in the unused high nibble
    lut, _ = grey_lut(dirty)
    assert lut[0xA000 | 1234] == lut[1234]
    assert torch.equal(tensor_of(prepare_dataset(dirty)), tensor_of(prepare_dataset(clean)))


def test_negative_rescale_slope_keeps_window_orientation() -> None:
    """Values below the window display black whatever the sign of the rescale slope."""
    stored = np.array([[0, 4095]], dtype=np.uint16)
    ds = factory.new_dataset(
        stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095, WindowCenter=2048, WindowWidth=1000
    )
    lut, _ = grey_lut(ds)
    assert lut[4095] == 0.0 and lut[0] == 1.0  # stored 4095 -> value 0 (below), stored 0 -> 4095 (above)


def test_rescale_slope_zero_is_refused_naming_it(display: np.ndarray) -> None:
    """A slope of 0 maps every pixel to one value: refused, not classified as a blank image."""
    stored = np.round(display * 4095).astype(np.uint16)
    ds = factory.new_dataset(stored, bits_stored=12, RescaleSlope=0, RescaleIntercept=100)
    assert_refused(prepare_dataset(ds), "voi", "RescaleSlope", "one value")


def test_native_fast_path_equals_pydicom_decoding(variant_tensors: dict[str, torch.Tensor]) -> None:
    """Native little-endian data are read in place; big-endian ones go through pydicom: same signed image, same
    tensor, bit for bit."""
    assert torch.equal(variant_tensors["signed_12bit"], variant_tensors["big_endian_dcmconv"])


def test_lut_cache_tells_headers_apart() -> None:
    stored = np.zeros((4, 4), np.uint16)
    base = {"bits_stored": 12, "WindowCenter": 1000, "WindowWidth": 500}
    first, _ = grey_lut(factory.new_dataset(stored, **base))
    assert not first.flags.writeable
    assert grey_lut(factory.new_dataset(stored, **base))[0] is first  # one table per device setting
    for change in (
        {"WindowCenter": 1001},
        {"WindowWidth": 501},
        {"photometric": "MONOCHROME1"},
        {"bits_stored": 13},
        {"RescaleSlope": 2, "RescaleIntercept": 0},
        {"VOILUTFunction": "SIGMOID"},
        {"PresentationLUTShape": "INVERSE"},
    ):
        other, _ = grey_lut(factory.new_dataset(stored, **{**base, **change}))
        assert not np.array_equal(other, first), change


def test_voi_lut_tables_are_not_shared_between_images() -> None:
    stored = np.zeros((4, 4), np.uint16)
    tables = []
    for gamma in (1.0, 2.0):
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.add_new("LUTData", "US", [int(v) for v in np.round(65535 * (np.arange(4096) / 4095) ** gamma)])
        tables.append(grey_lut(factory.new_dataset(stored, bits_stored=12, VOILUTSequence=Sequence([item])))[0])
    assert not np.array_equal(tables[0], tables[1])


def test_unusable_window_is_refused_naming_it(display: np.ndarray) -> None:
    ds = factory.new_dataset(np.round(display * 4095).astype(np.uint16), bits_stored=12, WindowCenter=100)
    ds.WindowWidth = 0
    assert_refused(prepare_dataset(ds), "voi", "WindowWidth")


def test_missing_view_and_body_part_are_allowed_and_noted(display: np.ndarray) -> None:
    ds = factory.new_dataset(np.round(display * 255).astype(np.uint8), ViewPosition=None, BodyPartExamined=None)
    result = prepare_dataset(ds)
    assert isinstance(result, PreparedImage)
    assert any("ViewPosition" in note for note in result.notes)
    assert any("BodyPartExamined" in note for note in result.notes)


def test_chest_anatomic_region_code_is_accepted(display: np.ndarray) -> None:
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
    ds = factory.new_dataset(
        np.round(display * 255).astype(np.uint8), BodyPartExamined=None, AnatomicRegionSequence=Sequence([region])
    )
    assert isinstance(prepare_dataset(ds), PreparedImage)


# --- refusals ---------------------------------------------------------------------------------------------------


def small(**attributes: object) -> Dataset:
    """A valid 12-bit 32x32 chest CR, changed by ``attributes``."""
    return factory.new_dataset(np.arange(1024, dtype=np.uint16).reshape(32, 32) % 256, bits_stored=12, **attributes)


def test_small_dataset_is_accepted() -> None:
    assert isinstance(prepare_dataset(small()), PreparedImage)


@pytest.mark.parametrize(
    ("attributes", "code", "attribute", "value"),
    [
        ({"ViewPosition": "LL"}, "not_frontal", "ViewPosition", "LL"),
        ({"ViewPosition": "RL"}, "not_frontal", "ViewPosition", "RL"),
        ({"BodyPartExamined": "HAND"}, "not_chest", "BodyPartExamined", "HAND"),
        ({"Modality": "CT", "SOPClassUID": factory.CT_IMAGE_STORAGE}, "modality", "Modality", "CT"),
        ({"Modality": "MR"}, "modality", "Modality", "MR"),
        ({"Modality": "OT"}, "modality", "Modality", "OT"),
        ({"Modality": None}, "modality", "Modality", "missing"),
        ({"Modality": "DX", "SOPClassUID": factory.DX_FOR_PROCESSING}, "for_processing", "SOPClassUID", "Processing"),
        (
            {"Modality": "DX", "SOPClassUID": factory.DX_FOR_PRESENTATION, "PresentationIntentType": "FOR PROCESSING"},
            "for_processing",
            "PresentationIntentType",
            "FOR PROCESSING",
        ),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1"}, "sop_class", "SOPClassUID", "1.2.840.10008.5.1.4.1.1.6.1"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour", "PhotometricInterpretation", "PALETTE COLOR"),
        ({"NumberOfFrames": 2}, "multiframe", "NumberOfFrames", "2"),
        ({"PixelData": None}, "no_pixels", "PixelData", "absent"),
        ({"Rows": 0}, "dimensions", "Rows", "0x32"),
        ({"BitsAllocated": 32, "BitsStored": 32}, "bit_depth", "BitsAllocated", "32"),
        ({"Rows": 64}, "truncated", "PixelData", "2,048 bytes"),
    ],
)
def test_header_refusal(attributes: dict[str, object], code: str, attribute: str, value: str) -> None:
    ds = small(**attributes)
    refusal, notes = check_header(ds)
    assert refusal is not None and notes == ()
    assert_refused(refusal, code, attribute, value)
    assert prepare_dataset(ds) == replace(refusal, sop_instance_uid=ds.SOPInstanceUID)


def test_non_chest_anatomic_region_is_refused() -> None:
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "85562004", "SCT", "Hand"
    ds = small(BodyPartExamined=None, AnatomicRegionSequence=Sequence([region]))
    assert_refused(prepare_dataset(ds), "not_chest", "AnatomicRegionSequence", "85562004")


def test_rgb_image_is_refused() -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    ds = factory.new_dataset(rgb[..., 0], PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    ds.PixelData = rgb.tobytes()
    assert_refused(prepare_dataset(ds), "colour", "PhotometricInterpretation", "RGB")
    ds.PhotometricInterpretation = "MONOCHROME2"  # a header that lies about its colour still says 3 samples
    assert_refused(prepare_dataset(ds), "colour", "SamplesPerPixel", "3")


def test_multiframe_with_real_frames_is_refused() -> None:
    frames = np.stack([np.full((16, 16), 10, np.uint8), np.full((16, 16), 200, np.uint8)])
    ds = factory.new_dataset(frames[0], NumberOfFrames=2)
    ds.PixelData = frames.tobytes()
    assert_refused(prepare_dataset(ds), "multiframe", "NumberOfFrames", "2")


def j2k_dataset(display: np.ndarray) -> Dataset:
    ds = factory.mono2_12bit(display)
    ds.compress(JPEG2000Lossless)
    return ds


def test_truncated_jpeg2000_codestream_is_refused(display: np.ndarray) -> None:
    ds = j2k_dataset(display)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    assert_refused(prepare_dataset(ds), "undecodable", "PixelData")


def test_truncated_jpeg2000_file_is_refused(display: np.ndarray, tmp_path: Path) -> None:
    path = factory.save(j2k_dataset(display), tmp_path / "j2k.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.warns(UserWarning, match="End of file"):
        result = prepare_path(path)
    assert isinstance(result, Refusal) and result.code == "truncated", result


def test_truncated_uncompressed_file_is_refused(display: np.ndarray, tmp_path: Path) -> None:
    path = factory.save(factory.mono2_12bit(display), tmp_path / "native.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    assert_refused(prepare_path(path), "truncated", "PixelData", "bytes where")


def test_encapsulated_data_without_fragments_is_refused(display: np.ndarray) -> None:
    ds = j2k_dataset(display)
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty Basic Offset Table and nothing else
    assert_refused(prepare_dataset(ds), "truncated", "PixelData", "no compressed data")


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(ds: Dataset) -> np.ndarray:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(preprocess, "decode_unit_image", fail)


def test_decompression_bomb_header_is_refused_before_decoding(
    display: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = j2k_dataset(display)
    ds.Rows = ds.Columns = 60000
    _forbid_decoding(monkeypatch)
    assert_refused(prepare_dataset(ds), "dimensions", "Rows", "60000x60000")


def test_codestream_larger_than_its_header_is_refused_before_decoding(
    display: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small Rows x Columns must not hide a 60000x60000 JPEG 2000 codestream from the size check."""
    ds = j2k_dataset(display)
    codestream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert codestream_size(bytes(codestream)) == display.shape
    codestream[8:16] = struct.pack(">2I", 60000, 60000)  # SIZ Xsiz, Ysiz
    ds.PixelData = encapsulate([bytes(codestream)])
    _forbid_decoding(monkeypatch)
    assert_refused(prepare_dataset(ds), "dimensions", "PixelData", "60000x60000")


BOMB_CHECK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))  # a 60000x60000 image needs 7.2 GB or more
from cxr_triage.ml.preprocess import prepare_path
for path in sys.argv[1:]:
    print(prepare_path(path).code)
"""


def test_decompression_bombs_are_refused_within_a_memory_limit(display: np.ndarray, tmp_path: Path) -> None:
    """End to end, in a process that cannot allocate a 60000x60000 image: both bombs come back refused."""
    header_bomb = j2k_dataset(display)
    header_bomb.Rows = header_bomb.Columns = 60000
    codestream_bomb = j2k_dataset(display)
    codestream = bytearray(next(generate_frames(codestream_bomb.PixelData, number_of_frames=1)))
    codestream[8:16] = struct.pack(">2I", 60000, 60000)
    codestream_bomb.PixelData = encapsulate([bytes(codestream)])
    paths = [factory.save(header_bomb, tmp_path / "a.dcm"), factory.save(codestream_bomb, tmp_path / "b.dcm")]
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_CHECK, *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["dimensions", "dimensions"]


def test_jpeg_sof_size_is_parsed() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((37, 53), np.uint8)).save(buf, format="JPEG")
    assert codestream_size(buf.getvalue()) == (37, 53)
    assert codestream_size(b"\x00" * 64) is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "DICOM"),
        (b"Patient report\nThis is a text file, not an image.\n" * 20, "DICOM"),
        (b"", "DICOM"),
    ],
    ids=["random", "text", "empty"],
)
def test_not_dicom_is_refused(content: bytes, words: str, tmp_path: Path) -> None:
    path = tmp_path / "input.dcm"
    path.write_bytes(content)
    result = prepare_path(path)
    assert isinstance(result, Refusal) and result.code == "not_dicom", result
    assert words in result.reason


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert prepare_path(tmp_path / "nothing.dcm").code == "unreadable"


def test_colour_png_and_jpeg_are_refused(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 255
    Image.fromarray(rgb).save(tmp_path / "blue.png")
    Image.fromarray(rgb).save(tmp_path / "blue.jpg")
    for name in ("blue.png", "blue.jpg"):
        result = prepare_path(tmp_path / name)
        assert isinstance(result, Refusal) and result.code == "colour", result


def test_grey_image_saved_as_rgb_is_accepted(display: np.ndarray, tmp_path: Path) -> None:
    grey = np.round(display * 255).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert torch.equal(
        tensor_of(prepare_path(tmp_path / "grey_rgb.png")), tensor_of(prepare_path(tmp_path / "grey.png"))
    )


def test_sixteen_bit_png_uses_its_full_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A ramp is not a chest: the pixel check for a lateral view (tests/test_symmetry.py) is off for this range test.
    monkeypatch.setattr(preprocess, "_pixel_view_refusal", lambda tensor, attribute: None)
    values = np.tile(np.linspace(0, 40000, 48).round().astype(np.uint16), (48, 1))
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert max_diff(tensor_of(prepare_path(tmp_path / "deep.png")), reference(values / 65535.0)) <= 1e-6


@pytest.mark.parametrize("damage", ["crc", "truncated"])
def test_corrupt_png_is_refused(damage: str, display: np.ndarray, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.round(display * 255).astype(np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    if damage == "crc":
        idat = data.index(b"IDAT")
        data[idat + 40 : idat + 60] = bytes(20)  # zero part of the compressed stream
    else:
        data = data[: len(data) // 2]
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    result = prepare_path(path)
    assert isinstance(result, Refusal) and result.code == "undecodable", result


@pytest.mark.parametrize("keyword", ["BitsAllocated", "Rows", "SamplesPerPixel"])
def test_a_us_value_of_impossible_length_is_a_refusal_not_a_failure(tmp_path: Path, keyword: str) -> None:
    """Found by the C-STORE fuzz: a US element three bytes long makes pydicom raise BytesLengthException when it
    is first read; the header check must refuse the instance (naming the attribute), not let the worker fail."""
    from cxr_triage.testing.synthetic import chest_dataset

    buffer = io.BytesIO()
    chest_dataset(16, 16, seed=1).save_as(buffer, enforce_file_format=True)
    raw, tag = buffer.getvalue(), pydicom.datadict.tag_for_keyword(keyword)
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"US" + struct.pack("<H", 2)
    at = raw.index(needle)
    broken = raw[:at] + needle[:6] + struct.pack("<H", 3) + raw[at + 8 : at + 10] + b"\0" + raw[at + 10 :]
    path = tmp_path / "broken.dcm"
    path.write_bytes(broken)
    refusal = prepare_dataset(read_dicom(path))
    assert isinstance(refusal, Refusal), refusal
    assert refusal.attribute == keyword and "unreadable: BytesLengthException" in refusal.reason
