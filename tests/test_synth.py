"""The phantom generator: RSNA layout, labels that parse back exactly, formats, determinism."""
import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumomap import cli, synth
from pneumomap.labels import POSITIVE_CLASS, load_rsna, opacity_target
from pneumomap.stages.lung_geometry import split_lungs

SIZE = 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return out, synth.generate(out, n=10, seed=7, size=SIZE)


def corrected(ds):
    """Stored pixels with MONOCHROME1 inverted: dense = bright."""
    pixels = ds.pixel_array.astype(np.float64)
    return (2 ** ds.BitsStored - 1) - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def test_labels_parse_back_into_the_drawn_boxes(dataset):
    out, records = dataset
    data = load_rsna(out)
    assert data.ids == [r.patient_id for r in records]
    for r in records:
        assert data.boxes[r.patient_id] == list(r.boxes)
        assert data.target[r.patient_id] == r.target == int(r.cls == POSITIVE_CLASS)
        assert data.cls[r.patient_id] == r.cls and data.split[r.patient_id] == r.split
        assert data.image_path(r.patient_id) == r.image_path and r.image_path.is_file()
        assert data.mask_path(r.patient_id) == r.mask_path
    assert {r.target for r in records} == {0, 1}


def test_dicoms_have_rsna_metadata_and_every_format(dataset):
    _, records = dataset
    for r in records:
        ds = pydicom.dcmread(r.image_path)
        assert ds.PatientID == r.patient_id and ds.SOPInstanceUID
        assert ds.Modality in ("CR", "DX") and ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert ds.pixel_array.shape == (SIZE, SIZE)
        assert (ds.PhotometricInterpretation, ds.BitsStored) == (r.photometric, r.bits_stored)
        assert ds.file_meta.TransferSyntaxUID == r.transfer_syntax
    assert {r.photometric for r in records} == {"MONOCHROME1", "MONOCHROME2"}
    assert {r.bits_stored for r in records} == {8, 12, 16}
    names = {pydicom.uid.UID(r.transfer_syntax).name for r in records}
    assert {"RLE Lossless", "JPEG 2000 Image Compression (Lossless Only)", "Explicit VR Little Endian"} <= names


def test_masks_and_anatomy(dataset):
    _, records = dataset
    for r in records:
        mask = np.asarray(Image.open(r.mask_path))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
        sides = split_lungs(mask)
        assert not sides.fallback and sides.right_box[1] < sides.left_box[1]
        image = corrected(pydicom.dcmread(r.image_path))
        spine = image[SIZE // 4: SIZE // 2, SIZE // 2 - 3: SIZE // 2 + 3]
        assert image[mask > 0].mean() < spine.mean()      # lungs dark, mediastinum bright


def test_same_seed_same_bytes(tmp_path):
    def files(out):
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    synth.generate(tmp_path / "a", n=3, seed=5, size=SIZE)
    synth.generate(tmp_path / "b", n=3, seed=5, size=SIZE, n_jobs=2)
    synth.generate(tmp_path / "c", n=3, seed=6, size=SIZE)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_opacities_are_brighter_and_occur_in_one_or_both_lungs():
    sides_seen = set()
    for i in range(12):
        p = synth.make_phantom(np.random.default_rng(i), SIZE, POSITIVE_CLASS)
        assert p.boxes
        target = opacity_target(p.boxes, p.lungs)
        assert p.image[target].mean() > p.image[p.lungs & ~target].mean()
        centres = {b.x + b.width / 2 < SIZE / 2 for b in p.boxes}
        sides_seen.add(len(centres))
    assert sides_seen == {1, 2}
    assert synth.make_phantom(np.random.default_rng(0), SIZE, "Normal").boxes == []


def test_about_a_third_positive():
    rng = np.random.default_rng(0)
    classes = [synth._choose_class(rng, 1 / 3) for _ in range(3000)]
    assert classes.count(POSITIVE_CLASS) / 3000 == pytest.approx(1 / 3, abs=0.03)
    assert set(classes) == {"Lung Opacity", "No Lung Opacity / Not Normal", "Normal"}


def test_cli(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--n", "2", "--seed", "1", "--size", "64"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert len(list((tmp_path / "stage_2_train_images").glob("*.dcm"))) == 2
    assert (tmp_path / "split.csv").read_text().startswith("patientId,split\n")
