"""Reader: real samples, every transfer syntax, bit depths, LUTs, flags and each kind of bad input."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from pneumomap.stages.reader import (ImageMeta, Radiograph, UnreadableImageError, list_images, read_image,
                                     read_images)

REAL = Path(__file__).parent / "data" / "real"
SIIM = REAL / "dicom" / "siim_cxr_jpeg_baseline.dcm"
SIIM_MONO1 = REAL / "dicom" / "siim_cxr_monochrome1_relabelled.dcm"
NIH = REAL / "dicom" / "nih_cxr_implicit_vr.dcm"
CT_SCOUT = REAL / "dicom" / "ct_scout_not_cxr.dcm"
NIH_PNG = REAL / "png" / "00000001_000.png"


# ----------------------------------------------------------------------------- helpers


def stored_pixels(bits: int) -> np.ndarray:
    """A 128x128 crop of the NIH image, scaled to fill ``bits`` bits."""
    crop = pydicom.dcmread(NIH).pixel_array[448:576, 448:576].astype(np.uint32)
    if bits == 8:
        return crop.astype(np.uint8)
    return (crop * (2**bits - 1) // 255).astype(np.uint16)


def make_dicom(path: Path, pixels: np.ndarray, bits: int, photometric: str = "MONOCHROME2",
               syntax: str = uid.ExplicitVRLittleEndian, **attrs) -> Path:
    """An uncompressed DICOM made from the NIH file's header and ``pixels``."""
    ds = pydicom.dcmread(NIH)
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def gdcm_transcode(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode ``src`` with python-gdcm (JPEG Baseline/Extended/Lossless, JPEG-LS)."""
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm (the JPEG / JPEG-LS encoder) is not installed")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        pytest.skip(f"gdcm cannot encode {uid.UID(syntax).name} here")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def pydicom_compress(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode ``src`` with pydicom's own encoders (RLE natively, JPEG 2000 via pylibjpeg-openjpeg)."""
    encoder = pydicom.pixels.get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no pydicom encoder plugin for {uid.UID(syntax).name}")
    ds = pydicom.dcmread(src)
    ds.compress(syntax)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def rewrite(src: Path, dst: Path, syntax: str) -> Path:
    """Re-write ``src`` uncompressed in another (implicit / explicit / deflated) transfer syntax."""
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(dst, enforce_file_format=True)
    return dst


def lung_and_spine(pixels: np.ndarray) -> tuple[float, float, float]:
    """Mean of the image-left lung field, the image-right lung field and the spine of a 1024 CXR."""
    return (float(pixels[300:650, 180:400].mean()), float(pixels[300:650, 624:844].mean()),
            float(pixels[250:750, 480:544].mean()))


# ----------------------------------------------------------------------------- real samples


def test_monochrome1_twin_is_exact_negative():
    mono2, mono1 = read_image(SIIM), read_image(SIIM_MONO1)
    assert mono1.meta.photometric == "MONOCHROME1"
    assert np.array_equal(mono1.pixels, 255.0 - mono2.pixels)


@pytest.mark.parametrize("path, syntax", [(SIIM, "JPEG Baseline (Process 1)"), (NIH, "Implicit VR Little Endian")])
def test_real_cxr_reads_with_dark_lungs_and_bright_spine(path, syntax):
    image = read_image(path)
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
    assert (image.meta.height, image.meta.width) == (1024, 1024)
    assert image.meta.transfer_syntax == syntax
    assert image.meta.image_id == path.stem
    right_lung, left_lung, spine = lung_and_spine(image.pixels)
    assert spine > right_lung + 40 and spine > left_lung + 40


def test_real_metadata():
    meta = read_image(SIIM).meta
    assert (meta.modality, meta.body_part, meta.view_position) == ("CR", "CHEST", "PA")
    assert meta.bits_stored == 8 and meta.photometric == "MONOCHROME2"
    assert meta.sop_instance_uid == pydicom.dcmread(SIIM).SOPInstanceUID
    assert meta.flags == []


def test_ct_scout_is_flagged_not_chest_and_nih_is_not():
    assert read_image(CT_SCOUT).meta.flags == ["not_chest: modality OT"]
    nih = read_image(NIH).meta
    assert nih.body_part is None and nih.flags == []


def test_body_part_other_than_chest_is_flagged(tmp_path):
    path = make_dicom(tmp_path / "knee.dcm", stored_pixels(8), 8, Modality="CR", BodyPartExamined="KNEE")
    assert read_image(path).meta.flags == ["not_chest: body part KNEE"]


def test_png_8bit_real():
    image = read_image(NIH_PNG)
    assert image.pixels.shape == (512, 512)
    assert image.meta.photometric == "MONOCHROME2" and image.meta.bits_stored == 8
    assert image.meta.transfer_syntax is None
    assert np.array_equal(image.pixels, np.asarray(Image.open(NIH_PNG), dtype=np.float32))


# ----------------------------------------------------------------------------- transfer syntaxes

LOSSLESS_GDCM = [uid.JPEGLosslessSV1, uid.JPEGLSLossless]
LOSSLESS_PYDICOM = [uid.RLELossless, uid.JPEG2000Lossless]
UNCOMPRESSED = [uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian]


@pytest.fixture(params=[8, 12, 16], ids=lambda b: f"{b}bit")
def source(request, tmp_path) -> tuple[Path, int]:
    bits = request.param
    return make_dicom(tmp_path / f"src{bits}.dcm", stored_pixels(bits), bits), bits


def assert_same_image(path: Path, reference: Path, syntax: str) -> None:
    image, expected = read_image(path), read_image(reference)
    assert image.meta.transfer_syntax == uid.UID(syntax).name
    assert image.meta.bits_stored == expected.meta.bits_stored
    assert np.array_equal(image.pixels, expected.pixels)


@pytest.mark.parametrize("syntax", LOSSLESS_GDCM, ids=lambda s: uid.UID(s).name)
def test_gdcm_lossless_round_trip(source, tmp_path, syntax):
    src, _ = source
    assert_same_image(gdcm_transcode(src, tmp_path / "c.dcm", syntax), src, syntax)


@pytest.mark.parametrize("syntax", LOSSLESS_PYDICOM, ids=lambda s: uid.UID(s).name)
def test_pydicom_lossless_round_trip(source, tmp_path, syntax):
    src, _ = source
    assert_same_image(pydicom_compress(src, tmp_path / "c.dcm", syntax), src, syntax)


@pytest.mark.parametrize("syntax", UNCOMPRESSED, ids=lambda s: uid.UID(s).name)
def test_uncompressed_syntaxes_round_trip(source, tmp_path, syntax):
    src, _ = source
    assert_same_image(rewrite(src, tmp_path / "c.dcm", syntax), src, syntax)


@pytest.mark.parametrize("syntax, bits", [(uid.JPEGBaseline8Bit, 8), (uid.JPEGExtended12Bit, 12)],
                         ids=["baseline-8bit", "extended-12bit"])
def test_lossy_jpeg_round_trip_is_close(tmp_path, syntax, bits):
    src = make_dicom(tmp_path / "src.dcm", stored_pixels(bits), bits)
    image = read_image(gdcm_transcode(src, tmp_path / "c.dcm", syntax))
    expected = read_image(src).pixels
    assert image.meta.transfer_syntax == uid.UID(syntax).name
    scale = 2**bits - 1
    assert np.abs(image.pixels - expected).mean() < 0.01 * scale
    assert np.abs(image.pixels - expected).max() < 0.05 * scale


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths_read_stored_values(tmp_path, bits):
    stored = stored_pixels(bits)
    image = read_image(make_dicom(tmp_path / "a.dcm", stored, bits))
    assert image.meta.bits_stored == bits
    assert np.array_equal(image.pixels, stored.astype(np.float32))


# ----------------------------------------------------------------------------- LUTs, frames, colour


def test_window_is_applied_and_monochrome1_inverted_after_it(tmp_path):
    stored = stored_pixels(12)
    window = dict(WindowCenter=3600, WindowWidth=200)
    mono2 = read_image(make_dicom(tmp_path / "m2.dcm", stored, 12, **window)).pixels
    mono1 = read_image(make_dicom(tmp_path / "m1.dcm", stored, 12, "MONOCHROME1", **window)).pixels
    low, high = stored < 3600 - 100, stored > 3600 + 100
    assert low.any() and high.any()
    assert np.all(mono2[low] == 0) and np.all(mono2[high] == 4095)
    assert np.array_equal(mono1, 4095.0 - mono2)


def test_rescale_is_applied_before_window(tmp_path):
    stored = stored_pixels(12)
    rescaled = read_image(make_dicom(tmp_path / "r.dcm", stored, 12, RescaleSlope=2, RescaleIntercept=-100)).pixels
    assert np.allclose(rescaled, stored * 2.0 - 100)


def test_multi_frame_reads_first_frame_and_flags(tmp_path):
    frames = np.stack([stored_pixels(8), 255 - stored_pixels(8), stored_pixels(8) // 2])
    path = make_dicom(tmp_path / "mf.dcm", frames, 8)
    image = read_image(path)
    assert np.array_equal(image.pixels, frames[0].astype(np.float32))
    assert "multi_frame: 3 frames, first frame used" in image.meta.flags


def test_rgb_dicom_reads_as_luminance_and_flags(tmp_path):
    grey = stored_pixels(8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    image = read_image(make_dicom(tmp_path / "rgb.dcm", rgb, 8, "RGB"))
    assert image.meta.photometric == "RGB"
    assert np.allclose(image.pixels, grey, atol=1e-3)
    assert any(flag.startswith("colour:") for flag in image.meta.flags)


def test_png_16bit_grey(tmp_path):
    stored = stored_pixels(16)
    Image.fromarray(stored).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.meta.bits_stored == 16
    assert np.array_equal(image.pixels, stored.astype(np.float32))


def test_png_rgb_and_jpeg(tmp_path):
    grey = stored_pixels(8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=95)
    rgb, jpeg = read_image(tmp_path / "rgb.png"), read_image(tmp_path / "grey.jpg")
    assert rgb.meta.photometric == "RGB" and np.allclose(rgb.pixels, grey, atol=1e-3)
    assert jpeg.meta.photometric == "MONOCHROME2" and np.abs(jpeg.pixels - grey).mean() < 2


# ----------------------------------------------------------------------------- bad input, one test each


def assert_unreadable(path: Path, *words: str) -> UnreadableImageError:
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    error = info.value
    assert error.path == str(path) and str(error) == f"{path}: {error.reason}"
    assert "\n" not in str(error) and "Traceback" not in str(error)
    for word in words:
        assert word in error.reason.lower()
    return error


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert_unreadable(tmp_path / "empty.dcm", "empty")


def test_truncated_uncompressed_dicom(tmp_path):
    (tmp_path / "t.dcm").write_bytes(NIH.read_bytes()[:60000])
    assert_unreadable(tmp_path / "t.dcm", "truncated")


def test_truncated_compressed_dicom(tmp_path):
    (tmp_path / "t.dcm").write_bytes(SIIM.read_bytes()[:60000])
    assert_unreadable(tmp_path / "t.dcm", "truncated")


def test_truncated_dicom_header(tmp_path):
    (tmp_path / "t.dcm").write_bytes(SIIM.read_bytes()[:300])
    assert_unreadable(tmp_path / "t.dcm", "truncated")


def test_text_file_named_dcm(tmp_path):
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n")
    assert_unreadable(tmp_path / "notes.dcm", "not a dicom")


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(NIH)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    assert_unreadable(tmp_path / "nopix.dcm", "no pixel data")


def test_unsupported_photometric_interpretation(tmp_path):
    path = make_dicom(tmp_path / "p.dcm", stored_pixels(8), 8)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(path, enforce_file_format=True)
    assert_unreadable(path, "unsupported photometric", "palette color")


def test_png_that_is_not_an_image(tmp_path):
    (tmp_path / "x.png").write_text("<html>not an image</html>")
    assert_unreadable(tmp_path / "x.png", "not a dicom, png or jpeg")


def test_missing_file(tmp_path):
    assert_unreadable(tmp_path / "nowhere.dcm", "no such file")


def test_directory_with_no_images(tmp_path):
    (tmp_path / "labels.csv").write_text("patientId\n")
    with pytest.raises(UnreadableImageError, match="no images"):
        list_images(tmp_path)


def test_missing_path_in_list_images(tmp_path):
    with pytest.raises(UnreadableImageError, match="no such file"):
        list_images(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- batches and listing


def test_read_images_keeps_order_with_a_bad_file_in_the_middle(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_text("nope")
    results = list(read_images([NIH, bad, SIIM, NIH_PNG], n_jobs=2))
    assert [type(r) for r in results] == [Radiograph, UnreadableImageError, Radiograph, Radiograph]
    assert [r.path if isinstance(r, UnreadableImageError) else r.meta.path for r in results] == \
        [str(NIH), str(bad), str(SIIM), str(NIH_PNG)]
    assert np.array_equal(results[0].pixels, read_image(NIH).pixels)


def test_error_pickles_for_worker_processes():
    error = pickle.loads(pickle.dumps(UnreadableImageError("a.dcm", "why")))
    assert (error.path, error.reason, str(error)) == ("a.dcm", "why", "a.dcm: why")


def test_list_images_directory_listfile_and_file(tmp_path):
    for name in ["b.dcm", "a.PNG", "sub/c.jpg", ".hidden/d.dcm", "notes.txt", "e.jpeg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = list_images(tmp_path)
    assert found == sorted([tmp_path / "a.PNG", tmp_path / "b.dcm", tmp_path / "e.jpeg", tmp_path / "sub/c.jpg"])
    (tmp_path / "list.txt").write_text("# test set\nsub/c.jpg\n\nb.dcm\n")
    assert list_images(tmp_path / "list.txt") == [tmp_path / "sub/c.jpg", tmp_path / "b.dcm"]
    assert list_images(NIH) == [NIH]


def test_meta_is_a_plain_dataclass():
    meta = read_image(NIH_PNG).meta
    assert isinstance(meta, ImageMeta) and meta.image_id == "00000001_000" and meta.flags == []


def test_jpeg_baseline_fast_decoder_gives_the_same_pixels(monkeypatch):
    from pneumomap.stages import reader

    fast = read_image(SIIM).pixels
    monkeypatch.setattr(reader, "FAST_DECODERS", {})  # pydicom's own order (gdcm first)
    assert np.array_equal(fast, read_image(SIIM).pixels)
