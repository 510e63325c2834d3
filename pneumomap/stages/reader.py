"""Read chest radiographs (DICOM, PNG, JPEG) into corrected float32 pixel arrays with metadata.

DICOM: modality LUT, then VOI LUT or window, then MONOCHROME1 inversion (after windowing, never
before), so that for every input bigger values are brighter (bone bright, lung dark). Presentation
LUT Shape INVERSE inverts the same way, once: MONOCHROME1 with INVERSE (the pairing DICOM
prescribes) is inverted once, MONOCHROME2 with INVERSE too (flagged). Every
transfer syntax pydicom can decode with its own, pylibjpeg or gdcm plugins is read; 12-bit JPEG
Extended falls back to gdcm directly. Multi-frame: first frame (flagged). Colour: luminance (flagged).

Every failure raises :class:`UnreadableImageError` naming the file and the reason.

Length (about 600 lines): one concern, turning every radiograph encoding into corrected pixels; most of it
is the DICOM photometric cases, which are easier to check side by side.
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
LIST_SUFFIXES = (".txt", ".lst", ".list")
DICOM_SUFFIXES = (".dcm", ".dicom")
MAX_PIXELS = 1 << 26  # 8192 x 8192: far above any radiograph (RSNA: 1024 x 1024; large detectors ~4300 x 4300)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")
CHEST_RADIOGRAPHY_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")
FRONTAL_VIEWS = ("AP", "PA")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601

T = TypeVar("T")


class UnreadableImageError(Exception):
    """The one exception type for an image that cannot be read; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ImageMeta:
    """What is known about one radiograph besides its pixels."""

    path: str
    image_id: str
    height: int
    width: int
    photometric: str
    bits_stored: int
    transfer_syntax: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    sop_instance_uid: str | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class Radiograph:
    """Corrected float32 (H, W) pixels (bigger = brighter) and their metadata."""

    pixels: np.ndarray
    meta: ImageMeta


# ----------------------------------------------------------------------------- public API


def read_image(path: str | os.PathLike) -> Radiograph:
    """Read one DICOM, PNG or JPEG file; raise UnreadableImageError on any failure."""
    path = Path(path)
    try:
        head = _read_head(path)
        image = _read_dicom(path) if _is_dicom(path, head) else _read_pillow(path)
    except UnreadableImageError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything from deep inside pydicom / Pillow / numpy, a decoder's panic too
        raise UnreadableImageError(path, _one_line(exc)) from None
    if not np.isfinite(image.pixels).all():
        bad = int(np.count_nonzero(~np.isfinite(image.pixels)))
        raise UnreadableImageError(path, f"{bad} pixel value(s) are not finite (NaN or infinite) after the "
                                         "modality and VOI LUTs (stored NaN, or a rescale slope that overflows)")
    return image


def map_images(fn: Callable[[Radiograph | UnreadableImageError], T], paths: Iterable[str | os.PathLike],
               n_jobs: int = 2, ahead: int | None = None) -> Iterator[T]:
    """Yield ``fn(read_image(p))`` (or ``fn(error)``) for each path, in input order, in ``n_jobs``
    worker processes (0: in the calling process, one at a time).

    ``fn`` runs inside the worker, so it can reduce a big image to something small before it is
    sent back; it must be picklable (a module-level function or a ``functools.partial`` of one).
    Bounded prefetch: at most ``ahead`` images (default ``4 * n_jobs``) are in flight; a new one is
    submitted only when the consumer takes one, so memory does not grow with the input list.
    The first ``ahead`` are submitted at once, before the first is asked for: a caller can start
    decoding, then load its models. The workers run at the lowest priority (`lower_priority`): on a machine with few cores they decode in the gaps of the networks
    instead of slowing them, and when the consumer waits for an image the cores are theirs.
    The pool is joblib's reusable executor: the same worker processes serve later calls.
    """
    if n_jobs <= 0:
        return (_apply(fn, str(p)) for p in paths)
    from joblib.executor import get_memmapping_executor

    # joblib's reusable pool (the one joblib.Parallel shares, so the two never fight over it),
    # with joblib's 300 s idle timeout: workers survive model loading between calls
    executor = get_memmapping_executor(n_jobs, timeout=300)
    limit = max(ahead if ahead is not None else 4 * n_jobs, 1)
    submit = functools.partial(executor.submit, _apply_in_worker, fn)
    return _Prefetch(submit, (str(p) for p in paths), limit)


class _Prefetch(Iterator):
    """`map_images`' results in input order: ``limit`` submitted at once, one more per result
    taken; `close` (also on garbage collection) cancels what is still queued."""

    def __init__(self, submit: Callable[[str], Any], paths: Iterator[str], limit: int) -> None:
        from collections import deque

        self.submit, self.paths = submit, paths
        self.pending = deque(submit(path) for path in itertools.islice(paths, limit))

    def __next__(self) -> Any:
        if not self.pending:
            raise StopIteration
        result = self.pending.popleft().result()
        for path in self.paths:  # refill one
            self.pending.append(self.submit(path))
            break
        return result

    def close(self) -> None:
        pending = getattr(self, "pending", ())
        while pending:
            pending.popleft().cancel()

    __del__ = close


def read_images(paths: Iterable[str | os.PathLike], n_jobs: int = 2) -> Iterator[Radiograph | UnreadableImageError]:
    """Read many images in worker processes, in input order; a failed image yields its error."""
    return map_images(identity, paths, n_jobs=n_jobs)


def list_images(source: str | os.PathLike) -> list[Path]:
    """Image files named by ``source``: a file, a list file (.txt/.lst: one path a line) or a directory.

    A directory is searched recursively (hidden entries skipped) for .dcm/.dicom/.png/.jpg/.jpeg
    files and extension-less DICOM files, sorted; it raises UnreadableImageError when none is found.
    A list file keeps its own order; relative entries are relative to the list file's folder.
    """
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in _walk(source) if _looks_like_image(p))
        if not found:
            raise UnreadableImageError(source, f"directory contains no images ({'/'.join(IMAGE_SUFFIXES)})")
        return found
    if not source.exists():
        raise UnreadableImageError(source, "no such file or directory")
    if source.suffix.lower() in LIST_SUFFIXES:
        return _read_list_file(source)
    return [source]


# ----------------------------------------------------------------------------- listing helpers


def _walk(root: Path) -> Iterator[Path]:
    """The files below ``root``; hidden entries and symlinked folders are skipped, and counted in one warning."""
    hidden, linked = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        hidden += sum(d.startswith(".") for d in dirnames) + sum(f.startswith(".") for f in filenames)
        linked += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames if not d.startswith("."))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath) / f for f in filenames if not f.startswith("."))
    if hidden or linked:
        import logging

        logging.getLogger("pneumomap").warning(
            "%s: skipped %d hidden file(s) or folder(s) (names starting with '.') and %d symlinked folder(s) "
            "(not followed); list the images in a .txt file to include them", root, hidden, linked)


def _looks_like_image(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    return suffix == "" and _has_dicm_marker(path)


def _has_dicm_marker(path: Path) -> bool:
    try:
        return _read_head(path)[128:132] == b"DICM"
    except (OSError, UnreadableImageError):
        return False


def _read_list_file(list_file: Path) -> list[Path]:
    entries = []
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableImageError(list_file, f"list file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line)
            entries.append(entry if entry.is_absolute() else list_file.parent / entry)
    if not entries:
        raise UnreadableImageError(list_file, "list file names no images")
    return entries


# ----------------------------------------------------------------------------- format detection


def _read_head(path: Path) -> bytes:
    if not path.exists():
        raise UnreadableImageError(path, "no such file")
    if path.is_dir():
        raise UnreadableImageError(path, "is a directory, not an image file")
    with open(path, "rb") as fh:
        head = fh.read(132)
    if not head:
        raise UnreadableImageError(path, "empty file (0 bytes)")
    return head


def _is_dicom(path: Path, head: bytes) -> bool:
    if head[128:132] == b"DICM":
        return True
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return False
    return path.suffix.lower() in DICOM_SUFFIXES or path.suffix == ""


def _check_size(path: Path, height: int, width: int) -> None:
    """Refuse, before decoding, an image whose header claims no pixels or more than MAX_PIXELS."""
    if height < 1 or width < 1:
        raise UnreadableImageError(path, f"the header gives an empty image ({height} x {width} pixels)")
    if height * width > MAX_PIXELS:
        raise UnreadableImageError(path, f"the header gives {height} x {width} pixels, more than the {MAX_PIXELS:,} "
                                         "a radiograph may have here (a corrupt header or not a radiograph)")


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path) -> Radiograph:
    ds = _dcmread(path)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    _check_dicom_image(path, ds, photometric)
    _check_size(path, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    frame, n_frames = _decode_first_frame(path, ds)
    flags = _dicom_flags(ds)
    if n_frames > 1:
        flags.append(f"multi_frame: {n_frames} frames, first frame used")
    if photometric == "MONOCHROME2" and _presentation_inverse(ds):
        flags.append("Presentation LUT Shape INVERSE on MONOCHROME2: inverted")
    if photometric in MONOCHROME:
        pixels = _correct_monochrome(frame, ds, photometric)
    elif frame.ndim == 2:  # a colour header on one sample per pixel: the data are grey
        pixels = _correct_monochrome(frame, ds, "MONOCHROME2")
        flags.append(f"colour header on grey data: {photometric} with one sample per pixel, read as MONOCHROME2")
    else:
        pixels = _luminance(frame)
        flags.append(f"colour: {photometric} converted to luminance")
    meta = ImageMeta(
        path=str(path), image_id=path.stem, height=int(pixels.shape[0]), width=int(pixels.shape[1]),
        photometric=photometric, bits_stored=int(ds.get("BitsStored", 8) or 8),
        transfer_syntax=_transfer_syntax_name(ds), modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"), view_position=_text(ds, "ViewPosition"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"), flags=flags,
    )
    return Radiograph(pixels=pixels, meta=meta)


def _dcmread(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    # from memory: a corrupt element length makes a file object allocate that length before reading
    # (an 8-byte file claiming 1.6 GB), a BytesIO returns the bytes there are
    data = path.read_bytes()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass  # no preamble/'DICM': may still be a raw data set
    except EOFError as exc:
        raise UnreadableImageError(path, f"truncated DICOM ({_one_line(exc)})") from None
    else:
        ended_early = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
        if ended_early or len(ds) == 0:
            detail = f" ({ended_early[0]})" if ended_early else ": no data set after the file meta header"
            raise UnreadableImageError(path, f"truncated DICOM{detail}")
        return ds
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        ok = "Rows" in ds and "Columns" in ds
    except Exception:
        ok = False
    if not ok:
        raise UnreadableImageError(path, "not a DICOM file (no 'DICM' marker and no image attributes)")
    return ds


def _check_dicom_image(path: Path, ds: Any, photometric: str) -> None:
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise UnreadableImageError(path, f"DICOM has no pixel data{kind}")
    if not photometric:
        raise UnreadableImageError(path, "DICOM has no PhotometricInterpretation")
    if photometric not in MONOCHROME + COLOUR:
        raise UnreadableImageError(
            path, f"unsupported photometric interpretation '{photometric}' "
                  f"(supported: {', '.join(MONOCHROME + COLOUR)})")


# Decoder tried first per transfer syntax, before the other plugins: Pillow decodes 8-bit JPEG
# Baseline to the same pixels as gdcm in a third of the time (1024 px: 2-3 ms against 9-11 ms).
FAST_DECODERS = {"1.2.840.10008.1.2.4.50": "pillow"}
# gdcm aborts the process on some corrupt files: it is the last resort, run in a child process
# (`pneumomap.stages.sandbox`), so that its crash fails one image, not the run
CRASH_PRONE = ("gdcm",)


def _decode_first_frame(path: Path, ds: Any) -> tuple[np.ndarray, int]:
    from pydicom.pixels import get_decoder, pixel_array

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = 0 if n_frames > 1 else None
    uid = getattr(ds.file_meta, "TransferSyntaxUID", None)
    frame, first_error = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoder = get_decoder(uid) if uid is not None else None
        except NotImplementedError:
            decoder = None
        if decoder is None or decoder.is_native:
            try:
                frame = pixel_array(ds, index=index)
            except Exception as exc:
                raise UnreadableImageError(path, _decode_reason(exc)) from None
        else:
            plugins = [p for p in decoder.available_plugins if p not in CRASH_PRONE]
            fast = FAST_DECODERS.get(str(uid))
            plugins.sort(key=lambda p: p != fast)
            for plugin in plugins:
                try:
                    frame = pixel_array(ds, index=index, decoding_plugin=plugin)
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # a plugin's panic too (pylibjpeg's are BaseExceptions)
                    first_error = first_error or exc
            if frame is None:
                frame = _decode_in_sandbox(path, index, first_error)
    if frame.ndim == 3 and frame.shape[-1] not in (3, 4):
        frame = frame[0]  # a decoder returned all frames
    return frame, n_frames


def _truncated(reason: str) -> bool:
    """Whether a decoder's message says the pixel data end early (no other decoder will do better)."""
    return "less than expected" in reason or "truncated" in reason.lower()


def _decode_reason(exc: BaseException) -> str:
    reason = _one_line(exc)
    if _truncated(reason):
        sizes = re.search(r"\((\d+) vs (\d+) bytes\)", reason)
        return f"truncated DICOM pixel data ({sizes[1]} of {sizes[2]} bytes)" if sizes else reason
    return f"cannot decode pixel data ({reason})"


def _decode_in_sandbox(path: Path, index: int | None, first_error: BaseException | None) -> np.ndarray:
    """gdcm, in the child process: its crash is this image's failure."""
    from pneumomap.stages.sandbox import DecoderCrashed, sandbox

    if first_error is not None and _truncated(str(first_error)):
        raise UnreadableImageError(path, _decode_reason(first_error))
    try:
        return sandbox().call(_decode_with_gdcm, str(path), index, None if first_error is None else _one_line(first_error))
    except DecoderCrashed as exc:
        raise UnreadableImageError(path, f"cannot decode pixel data: {exc}") from None


def _decode_with_gdcm(path_text: str, index: int | None, earlier: str | None) -> np.ndarray:
    """Runs in the sandbox: gdcm through pydicom, else gdcm directly (e.g. 12-bit JPEG Extended)."""
    from pydicom.pixels import pixel_array

    path = Path(path_text)
    ds = _dcmread(path)
    reasons = [earlier] if earlier else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=index, decoding_plugin="gdcm")
    except Exception as exc:
        reasons.append(_one_line(exc))
    if ds.get("SamplesPerPixel", 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise UnreadableImageError(path, f"cannot decode pixel data ({'; '.join(reasons)})")
    try:
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        if not reader.Read():
            raise RuntimeError("gdcm could not read the file")
        raw = reader.GetImage().GetBuffer()
        if not raw:
            raise RuntimeError("gdcm could not decode the pixel data")
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
        return np.frombuffer(data, dtype=_stored_dtype(ds))[: ds.Rows * ds.Columns].reshape(ds.Rows, ds.Columns)
    except Exception as exc:
        raise UnreadableImageError(path, f"cannot decode pixel data ({'; '.join(reasons)}; gdcm: {_one_line(exc)})") from None


def _stored_dtype(ds: Any) -> np.dtype:
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    nbytes = 1 if int(ds.BitsAllocated) <= 8 else 2
    return np.dtype(f"<{'i' if signed else 'u'}{nbytes}")


def _presentation_inverse(ds: Any) -> bool:
    """Whether Presentation LUT Shape (2050,0020) is INVERSE: the minimum value is displayed white."""
    return str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"


def _correct_monochrome(frame: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then one inversion within the output range for
    MONOCHROME1 or Presentation LUT Shape INVERSE (both: still once, as DICOM pairs them)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(frame, ds)
    voi = _voi_kind(ds)
    if voi == "lut" and np.issubdtype(values.dtype, np.floating):
        values = np.rint(values).astype(np.int64)  # VOI LUT tables index integer values
    if voi is not None:
        values = apply_voi_lut(values, ds)
    pixels = np.asarray(values, dtype=np.float32)
    if photometric == "MONOCHROME1" or _presentation_inverse(ds):
        low, high = _output_range(ds, voi)
        pixels = np.float32(low + high) - pixels
    return pixels


def _voi_kind(ds: Any) -> str | None:
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _output_range(ds: Any, voi: str | None) -> tuple[float, float]:
    """(min, max) of the values after the LUTs; windowing keeps the modality LUT's range (as pydicom does)."""
    if voi == "lut":
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        ends = (low * float(slope) + float(intercept), high * float(slope) + float(intercept))
        low, high = min(ends), max(ends)
    return low, high


def _dicom_flags(ds: Any) -> list[str]:
    flags = []
    modality, body_part, view = _text(ds, "Modality"), _text(ds, "BodyPartExamined"), _text(ds, "ViewPosition")
    if modality and modality.upper() not in CHEST_RADIOGRAPHY_MODALITIES:
        flags.append(f"not_chest: modality {modality}")
    if body_part and not any(part in body_part.upper() for part in CHEST_BODY_PARTS):
        flags.append(f"not_chest: body part {body_part}")
    if view and view.upper() not in FRONTAL_VIEWS:
        flags.append(f"not_frontal: view position {view}")
    return flags


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _transfer_syntax_name(ds: Any) -> str | None:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else None


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float32) @ LUMA_WEIGHTS


# ----------------------------------------------------------------------------- PNG / JPEG


def _read_pillow(path: Path) -> Radiograph:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_size(path, image.height, image.width)
            image = ImageOps.exif_transpose(image)
            pixels, photometric, bits, flags = _pillow_pixels(image)
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not a DICOM, PNG or JPEG image (unrecognised file content)") from None
    except OSError as exc:
        raise UnreadableImageError(path, f"truncated or corrupt image ({_one_line(exc)})") from None
    meta = ImageMeta(
        path=str(path), image_id=path.stem, height=int(pixels.shape[0]), width=int(pixels.shape[1]),
        photometric=photometric, bits_stored=bits, flags=flags,
    )
    return Radiograph(pixels=pixels, meta=meta)


def _pillow_pixels(image: Any) -> tuple[np.ndarray, str, int, list[str]]:
    """float32 grey pixels, photometric ('MONOCHROME2' or 'RGB'), bits stored and flags of a Pillow image."""
    mode = image.mode
    if mode in ("L", "LA", "1"):
        return np.asarray(image.convert("L"), dtype=np.float32), "MONOCHROME2", 8, []
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image)
        bits = 8 if array.dtype == np.uint8 else 16 if array.dtype.itemsize <= 2 or array.max() < 65536 else 32
        return array.astype(np.float32), "MONOCHROME2", bits, []
    rgb = np.asarray(image.convert("RGB"))
    return _luminance(rgb), "RGB", 8, [f"colour: {mode} converted to luminance"]


# ----------------------------------------------------------------------------- workers


def identity(item: T) -> T:
    """``item`` unchanged: a picklable no-op for worker pools (`read_images`, a DataLoader's collate_fn)."""
    return item


def read_or_error(path: str | os.PathLike) -> Radiograph | UnreadableImageError:
    """`read_image`, with the error returned instead of raised (for batches)."""
    try:
        return read_image(path)
    except UnreadableImageError as exc:
        return exc


def _apply(fn: Callable[[Radiograph | UnreadableImageError], T], path: str) -> T:
    return fn(read_or_error(path))


def lower_priority() -> None:
    """Run this process at the lowest priority (nice 19): the CPU mostly when nothing else wants it.

    Why: torch's threads wait for each other at every operation, so one core taken by a decode
    worker stalls them all. At nice 19 a network beside busy decode workers runs nearly as fast
    as alone, and the workers still decode; at normal priority many times slower
    (benchmarks/RESULTS.md, "Figures behind design choices").
    Linux's SCHED_IDLE starved the workers whenever they were needed (runnable, never run, on an
    idle machine: a virtualised kernel), so it is not used.
    """
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))


_lowered = False  # this worker process runs at the lowest priority


def _apply_in_worker(fn: Callable[[Radiograph | UnreadableImageError], T], path: str) -> T:
    global _lowered
    if not _lowered:
        _lowered = True
        lower_priority()
    return _apply(fn, path)
