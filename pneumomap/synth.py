"""Write a phantom RSNA-format data set: chest-like DICOMs, label CSVs, lung masks and a split.

Each image has two lungs of varied shape, size and position (the patient's right lung on the
image's left, usually a little larger), ribs, clavicles, spine, mediastinum, heart, soft
tissue, noise and a side marker. About a third are 'Lung Opacity': blurred, textured, brighter
regions inside one or both lungs with an RSNA box (x, y, width, height; top-left corner)
around each. The files mix MONOCHROME2 and MONOCHROME1, 8/12/16 bits stored, uncompressed,
RLE Lossless, JPEG 2000 Lossless and JPEG Baseline transfer syntaxes, CR and DX, PA and AP.

The same --seed gives the same bytes; image i depends only on (seed, i), so a bigger --n
adds images without changing the first ones.
"""
from __future__ import annotations

import argparse
import io
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import draw, transform

from pneumomap.fileio import atomic_write_bytes, atomic_write_text, write_png
from pneumomap.labels import (CLASS_FILE, CLASSES, IMAGES_DIR, LABELS_FILE, MASKS_DIR, POSITIVE_CLASS,
                              SPLIT_FILE, Box, make_split, write_split)

NOT_NORMAL, NORMAL = CLASSES[1], CLASSES[2]
WORK_SIZE = 512  # anatomy is drawn at most at this resolution, then upsampled

# (col, row) outlines in [0, 1]; both drawn as the image-left lung, the left lung is mirrored.
RIGHT_LUNG = np.array([(0.34, 0.15), (0.27, 0.18), (0.21, 0.25), (0.17, 0.36), (0.15, 0.50), (0.14, 0.64),
                       (0.14, 0.76), (0.16, 0.83), (0.22, 0.80), (0.30, 0.76), (0.38, 0.735), (0.44, 0.74),
                       (0.455, 0.62), (0.45, 0.45), (0.435, 0.30), (0.41, 0.20), (0.38, 0.16)])
LEFT_LUNG = np.array([(0.34, 0.16), (0.27, 0.19), (0.21, 0.26), (0.17, 0.37), (0.155, 0.50), (0.145, 0.64),
                      (0.145, 0.77), (0.165, 0.85), (0.23, 0.83), (0.29, 0.80), (0.33, 0.77), (0.36, 0.68),
                      (0.40, 0.58), (0.44, 0.48), (0.445, 0.36), (0.43, 0.26), (0.40, 0.19), (0.37, 0.165)])


@dataclass(frozen=True)
class DicomFormat:
    photometric: str
    bits: int
    transfer_syntax: str  # UID


def _formats() -> tuple[DicomFormat, ...]:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

    return (DicomFormat("MONOCHROME2", 8, JPEGBaseline8Bit), DicomFormat("MONOCHROME2", 16, RLELossless),
            DicomFormat("MONOCHROME1", 12, ExplicitVRLittleEndian), DicomFormat("MONOCHROME2", 8, ExplicitVRLittleEndian),
            DicomFormat("MONOCHROME1", 16, JPEG2000Lossless), DicomFormat("MONOCHROME2", 12, RLELossless),
            DicomFormat("MONOCHROME1", 8, RLELossless), DicomFormat("MONOCHROME2", 16, ExplicitVRLittleEndian))


@dataclass
class Phantom:
    """One drawn radiograph: ``image`` float32 in [0, 1] with dense = bright, ``lungs`` bool."""

    image: np.ndarray
    lungs: np.ndarray
    boxes: list[Box]
    cls: str


@dataclass(frozen=True)
class PhantomRecord:
    """What `generate` wrote for one image (the boxes are exactly those in the labels file)."""

    patient_id: str
    cls: str
    target: int
    boxes: tuple[Box, ...]
    split: str
    photometric: str
    bits_stored: int
    transfer_syntax: str
    modality: str
    view_position: str
    image_path: Path
    mask_path: Path


# ---------------------------------------------------------------- drawing helpers

def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): column and row coordinates of pixel centres in [0, 1]."""
    axis = (np.arange(n, dtype=np.float32) + 0.5) / n
    return axis[None, :], axis[:, None]


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of about ``cells`` blobs across (n, n)."""
    noise = transform.resize(rng.standard_normal((cells, cells)), (n, n), order=3, mode="reflect")
    return ((noise - noise.mean()) / (noise.std() + 1e-6)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _lung_field(rng: np.random.Generator, n: int, outline: np.ndarray, mirror: bool, scale: float,
                shift: np.ndarray) -> np.ndarray:
    """Soft (0..1) field of one lung: a jittered, scaled outline, rasterised and blurred."""
    centre = outline.mean(axis=0)
    pts = (outline - centre) * scale * rng.uniform(0.92, 1.06, 2) + centre + shift + rng.uniform(-0.02, 0.02, 2)
    pts = pts + rng.uniform(-0.008, 0.008, pts.shape)
    if mirror:
        pts[:, 0] = 1.0 - pts[:, 0]
    field = np.zeros((n, n), dtype=np.float32)
    rr, cc = draw.polygon(pts[:, 1] * n, pts[:, 0] * n, (n, n))
    field[rr, cc] = 1.0
    return ndimage.gaussian_filter(field, 0.012 * n)


def _band(distance: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * (distance / width) ** 2)


def _ribs(u: np.ndarray, v: np.ndarray, body_half: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs (arching down laterally) plus fainter anterior ribs, both sides at once."""
    dx = np.abs(u - 0.5 - rng.uniform(-0.01, 0.01))
    start, spacing = rng.uniform(0.13, 0.17), rng.uniform(0.058, 0.07)
    t = (v - start + 0.25 * dx - 1.1 * dx ** 2) / spacing
    profile = np.clip((np.cos(2 * np.pi * t) - 0.4) / 0.6, 0, 1) ** 0.6
    posterior = profile * ((t > -0.25) & (t < 8.5)) * _sigmoid((dx - 0.04) / 0.01) * _sigmoid((body_half - dx - 0.02) / 0.01)
    ta = (v - start - 0.05 - 0.45 * np.clip(0.45 - dx, 0, None) ** 1.5) / (spacing * 1.15)
    anterior = np.clip(np.cos(2 * np.pi * ta), 0, 1) ** 2 * ((ta > 0) & (ta < 5)) * _sigmoid((dx - 0.12) / 0.02)
    return posterior + 0.35 * anterior * _sigmoid((body_half - dx - 0.03) / 0.01)


def _anatomy(rng: np.random.Generator, n: int, cls: str) -> tuple[np.ndarray, np.ndarray]:
    """(intensity, soft lung field without the heart) at (n, n); dense = bright."""
    u, v = _grid(n)
    scale, shift = rng.uniform(0.9, 1.05), np.array([rng.uniform(-0.03, 0.03), rng.uniform(-0.04, 0.03)])
    right = _lung_field(rng, n, RIGHT_LUNG, False, scale * rng.uniform(1.0, 1.06), shift)
    left = _lung_field(rng, n, LEFT_LUNG, True, scale * rng.uniform(0.93, 1.0), shift)
    heart_r = np.array([rng.uniform(0.12, 0.15), rng.uniform(0.085, 0.11)]) * (1.3 if cls == NOT_NORMAL and rng.random() < 0.6 else 1.0)
    hx, hy = 0.585 + shift[0] + rng.uniform(-0.015, 0.015), 0.66 + shift[1] + rng.uniform(-0.02, 0.02)
    heart = _sigmoid((1 - np.hypot((u - hx) / heart_r[0], (v - hy) / heart_r[1])) / 0.06)
    lungs = np.clip(right + left, 0, 1) * (1 - heart)

    body_half = (0.45 + rng.uniform(-0.03, 0.02)) - 0.26 * _sigmoid((0.09 - v) / 0.02)
    body = _sigmoid((body_half - np.abs(u - 0.5)) / 0.008)
    spine_x = 0.5 + shift[0] * 0.5
    image = 0.06 + body * (0.42 + 0.12 * (1 - ((u - 0.5) / 0.45) ** 2))
    image = image + 0.10 * _band(u - spine_x, 0.07) * _sigmoid((0.82 - v) / 0.03) + 0.06 * heart
    image = image + 0.08 * _band(u - spine_x, 0.025) * (0.7 + 0.3 * np.cos(2 * np.pi * v / 0.045))
    depth = rng.uniform(0.24, 0.34) * (0.9 + 0.1 * _smooth_noise(rng, n, 4))
    image = image - depth * lungs
    markings = 0.015 * _smooth_noise(rng, n, 40) + 0.05 * (_band(np.hypot(u - 0.41, v - 0.47), 0.05)
                                                           + _band(np.hypot(u - 0.59, v - 0.47), 0.05))
    image = image + markings * lungs
    clavicle = _band(v - (0.13 + shift[1] - 0.12 * np.abs(u - 0.5) + 0.7 * (np.abs(u - 0.5) - 0.15) ** 2), 0.011)
    image = image + 0.11 * clavicle * body * (np.abs(u - 0.5) < 0.32)
    image = image + rng.uniform(0.04, 0.07) * _ribs(u, v, body_half, rng) * body
    if cls == NOT_NORMAL and rng.random() < 0.5 or rng.random() < 0.15:
        image = image + 0.25 * _band(u - spine_x - 0.015 - 0.02 * v, 0.003) * (v < 0.55)  # a tube
    return image.astype(np.float32), lungs.astype(np.float32)


def _opacities(rng: np.random.Generator, lungs: np.ndarray, scale: float
               ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Add 1-4 textured blobs inside one or both lungs: (field, boxes as work-res row/col boxes)."""
    n = lungs.shape[0]
    u, v = _grid(n)
    inside = lungs > 0.5
    interior = ndimage.distance_transform_edt(inside) > 0.04 * n
    half = np.broadcast_to(u < 0.5, inside.shape)
    sides = [rng.integers(2)] if rng.random() < 0.55 else [0, 1]
    field = np.zeros_like(lungs)
    boxes = []
    for side in sides:
        for _ in range(1 + (rng.random() < 0.15)):
            rows, cols = np.nonzero(interior & (half if side == 0 else ~half))
            k = rng.integers(len(rows))
            su, sv = rng.uniform(0.035, 0.07), rng.uniform(0.045, 0.1)
            r2 = ((u - (cols[k] + 0.5) / n) / su) ** 2 + ((v - (rows[k] + 0.5) / n) / sv) ** 2
            blob = np.exp(-0.5 * r2 ** 2)  # flat-topped: a consolidated patch with a soft rim
            texture = np.clip(0.75 + 0.25 * _smooth_noise(rng, n, 30), 0.3, 1.0)
            support = (blob > 0.15) & inside
            if support.sum() < 0.0005 * n * n:
                continue
            field = np.maximum(field, blob * texture * scale)
            r, c = np.nonzero(support)
            boxes.append((r.min(), c.min(), r.max() + 1, c.max() + 1))
    return field * lungs, boxes


def _marker(size: int, rng: np.random.Generator) -> np.ndarray:
    """A bright side-marker letter ('R' near the image left, or 'L' near the image right)."""
    from PIL import Image, ImageDraw, ImageFont

    letter = "R" if rng.random() < 0.6 else "L"
    font_size = max(6, int(size * rng.uniform(0.035, 0.05)))
    col = size * (rng.uniform(0.03, 0.08) if letter == "R" else rng.uniform(0.88, 0.93))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).text((col, size * rng.uniform(0.03, 0.07)), letter, fill=255,
                                font=ImageFont.load_default(font_size))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def make_phantom(rng: np.random.Generator, size: int, cls: str) -> Phantom:
    """Draw one radiograph of class ``cls`` at (size, size); boxes are in pixels of that size."""
    n = min(size, WORK_SIZE)
    image, lungs = _anatomy(rng, n, cls)
    boxes: list[Box] = []
    if cls == POSITIVE_CLASS:
        opacity, work_boxes = _opacities(rng, lungs, rng.uniform(0.15, 0.32))
        image = image + opacity
        f = size / n
        boxes = [Box(float(c0 * f), float(r0 * f), float((c1 - c0) * f), float((r1 - r0) * f))
                 for r0, c0, r1, c1 in work_boxes]
    if n != size:
        image = transform.resize(image, (size, size), order=1, anti_aliasing=False).astype(np.float32)
        lungs = transform.resize(lungs, (size, size), order=1, anti_aliasing=False).astype(np.float32)
    exposure = 1 + 0.06 * np.linspace(-1, 1, size, dtype=np.float32)[None, :] * rng.choice([-1, 1])
    image = image * exposure + rng.uniform(0.004, 0.015) * rng.standard_normal((size, size), dtype=np.float32)
    image = np.maximum(image, 0.95 * _marker(size, rng))
    image = np.clip(image, 0, 1) ** np.float32(rng.uniform(0.8, 1.2))
    return Phantom(image.astype(np.float32), lungs > 0.5, boxes, cls if boxes or cls != POSITIVE_CLASS else NOT_NORMAL)


# ---------------------------------------------------------------- DICOM writing

def _uid(seed: int, index: int, kind: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["pneumomap-synth", str(seed), str(index), kind])


def _stored(image: np.ndarray, fmt: DicomFormat) -> np.ndarray:
    """Quantise [0, 1] (dense = bright) to stored values; MONOCHROME1 stores the inverse."""
    top = 2 ** fmt.bits - 1
    values = np.rint(image * top)
    if fmt.photometric == "MONOCHROME1":
        values = top - values
    return values.astype(np.uint8 if fmt.bits == 8 else np.uint16)


def _encode(ds, arr: np.ndarray, fmt: DicomFormat) -> None:
    """Set and compress the pixel data of ``ds`` in ``fmt``'s transfer syntax."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, UncompressedTransferSyntaxes

    ds.set_pixel_data(arr, fmt.photometric, fmt.bits, generate_instance_uid=False)
    if fmt.transfer_syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    elif fmt.transfer_syntax not in UncompressedTransferSyntaxes:
        ds.compress(fmt.transfer_syntax, generate_instance_uid=False)


def dicom_bytes(image: np.ndarray, fmt: DicomFormat, patient_id: str, seed: int, index: int,
                modality: str, view: str) -> bytes:
    """A complete DICOM file for one phantom; deterministic given its arguments."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    sop_class = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = _uid(seed, index, "sop")
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(seed, index, "study"), _uid(seed, index, "series")
    ds.PatientID = ds.PatientName = patient_id
    ds.PatientSex, ds.PatientAge = "O", "050Y"
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", view
    ds.SeriesDescription = f"view: {view}"
    ds.ConversionType = "WSD"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PixelSpacing = [0.168, 0.168]
    _encode(ds, _stored(image, fmt), fmt)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------- the data set

def _choose_class(rng: np.random.Generator, positive_fraction: float) -> str:
    r = rng.random()
    if r < positive_fraction:
        return POSITIVE_CLASS
    return NOT_NORMAL if r < positive_fraction + 0.55 * (1 - positive_fraction) else NORMAL


def _write_one(out: Path, seed: int, index: int, size: int, positive_fraction: float) -> PhantomRecord:
    """Draw and write image ``index``; its randomness depends only on (seed, index)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    formats = _formats()
    fmt = formats[(index + seed) % len(formats)]
    modality, view = rng.choice(["CR", "DX"]).item(), rng.choice(["PA", "AP"]).item()
    phantom = make_phantom(rng, size, _choose_class(rng, positive_fraction))
    image_path, mask_path = out / IMAGES_DIR / f"{pid}.dcm", out / MASKS_DIR / f"{pid}.png"
    atomic_write_bytes(image_path, dicom_bytes(phantom.image, fmt, pid, seed, index, modality, view))
    write_png(mask_path, phantom.lungs.astype(np.uint8) * 255)
    return PhantomRecord(pid, phantom.cls, int(bool(phantom.boxes)), tuple(phantom.boxes), "", fmt.photometric,
                         fmt.bits, str(fmt.transfer_syntax), modality, view, image_path, mask_path)


def _label_rows(record: PhantomRecord) -> list[str]:
    """RSNA rows for one image: one per box, or one empty-box row with Target 0."""
    if not record.boxes:
        return [f"{record.patient_id},,,,,0"]
    return [f"{record.patient_id},{float(b.x)},{float(b.y)},{float(b.width)},{float(b.height)},1" for b in record.boxes]


def _write_tables(out: Path, records: list[PhantomRecord]) -> None:
    labels = ["patientId,x,y,width,height,Target"] + [row for r in records for row in _label_rows(r)]
    classes = ["patientId,class"] + [f"{r.patient_id},{r.cls}" for r in records for _ in _label_rows(r)]
    atomic_write_text(out / LABELS_FILE, "\n".join(labels) + "\n")
    atomic_write_text(out / CLASS_FILE, "\n".join(classes) + "\n")


def generate(out: str | Path, n: int, seed: int, size: int = 1024, *,
             fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), positive_fraction: float = 1 / 3,
             n_jobs: int = 1, progress: bool = False) -> list[PhantomRecord]:
    """Write ``n`` phantom images as an RSNA-format folder at ``out``; return what was written.

    Image i depends only on (seed, i). The split is by patient, stratified by Target.
    """
    from joblib import Parallel, delayed
    from tqdm import tqdm

    if n < 1 or size < 64:
        raise ValueError(f"need n >= 1 and size >= 64, got n={n}, size={size}")
    out = Path(out)
    jobs = (delayed(_write_one)(out, seed, i, size, positive_fraction) for i in range(n))
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    records = list(tqdm(results, total=n, desc="synth", unit="image", disable=not progress))
    ids = [r.patient_id for r in records]
    split = make_split(ids, {r.patient_id: r.target for r in records}, fractions, seed)
    records = [replace(r, split=split[r.patient_id]) for r in records]
    _write_tables(out, records)
    write_split(out / SPLIT_FILE, split)
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (RSNA layout)")
    parser.add_argument("--n", type=int, default=40, help="number of images (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels (default 1024)")
    parser.add_argument("--positive-fraction", type=float, default=1 / 3, help="share of 'Lung Opacity' images")
    parser.add_argument("--split", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                        help="split fractions by patient (default 0.6 0.2 0.2)")
    from pneumomap.cli import add_quiet_argument, add_workers_argument

    add_workers_argument(parser, 1, "worker processes that draw and write the images (default 1)")
    add_quiet_argument(parser)


def main(args: argparse.Namespace) -> int:
    records = generate(args.out, args.n, args.seed, args.size, fractions=tuple(args.split),
                       positive_fraction=args.positive_fraction, n_jobs=args.workers, progress=not args.quiet)
    positives = sum(r.target for r in records)
    print(f"wrote {len(records)} images ({positives} with opacity) to {args.out}")
    return 0
