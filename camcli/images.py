"""Finding images, decoding them robustly, and preprocessing them without cropping."""

from __future__ import annotations

import glob
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from camcli.errors import ImageError, UsageError
from camcli.options import BY_NAME

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

DEFAULT_MAX_PIXELS: int = BY_NAME["max_pixels"].default  # Pillow's own decompression-bomb threshold
STRIP_PIXELS = 1 << 22  # pixels converted to RGB at a time: decoding needs one full-size copy, not three
REDUCE_ABOVE = 1 << 24  # read_image(fit=...): larger images are decoded reduced; smaller ones exactly as usual


@dataclass(frozen=True)
class ImageSource:
    path: Path  # the path as the user gave it or as found in a folder (links are not resolved)
    rel: Path  # path relative to the common root of all inputs: mirrored under --out


@dataclass
class Found:
    """What :func:`find_images` found: the sources, and the folder entries it had to pass over."""

    sources: list[ImageSource]
    skipped: list[Path] = field(default_factory=list)  # FIFOs, sockets, broken links with an image suffix


def skipped_warning(skipped: Sequence[str | Path]) -> str | None:
    """The one warning explain and evaluate give about folder entries they passed over, if any."""
    if not skipped:
        return None
    return (f"skipped {len(skipped)} folder entries that are not regular files (a FIFO, a socket or a broken link), "
            f"first: {skipped[0]}")


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def _folder_images(folder: Path, recursive: bool, skipped: list[Path]) -> list[Path]:
    """Regular files with an image suffix; other entries with an image suffix (a FIFO, a socket, a
    link to nothing) are passed over and counted: opening a FIFO would block the run."""
    files = []
    for f in folder.rglob("*") if recursive else folder.iterdir():
        if not _is_image_name(f):
            continue
        if f.is_file():
            files.append(f)
        elif not f.is_dir():
            skipped.append(f)
    return sorted(files)


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern searches: its components up to the first with a wildcard."""
    parts = Path(pattern).parts
    fixed = [c for c in parts[: next((i for i, c in enumerate(parts) if glob.has_magic(c)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


class _Outputs:
    """Recognises camcli's outputs in the output folder, so that no input list ever includes them.

    When the folder searched holds the output folder (``explain in -r -o in/heat``), everything in
    the output folder is an output. When the output folder is the folder searched, or holds it
    (``explain in -o in``), the user's images live there too: then only files named as camcli
    names its maps (``<image>.<method>[.<layer>][.<class>][.grid].png`` or ``.npy``) are outputs.
    """

    def __init__(self, out: Path, method_files: Collection[str]) -> None:
        self.out = Path(os.path.realpath(out))
        self.methods = set(method_files)  # method names as they appear in file names (gradcampp)

    def holds(self, f: Path, searched: Path) -> bool:
        real = Path(os.path.realpath(f.parent)) / f.name  # the file's own name, in its real folder
        if self.out not in real.parents:
            return False
        if Path(os.path.realpath(searched)) in self.out.parents:
            return True  # an output folder inside the folder searched: nothing in it is an input
        return self.is_output_name(f.name)

    def is_output_name(self, name: str) -> bool:
        parts = name.split(".")
        return parts[-1].lower() in ("png", "npy") and any(p in self.methods for p in parts[1:-1])


def discover(paths: Sequence[str | Path], recursive: bool = False, exclude: Path | None = None,
             method_files: Collection[str] = ()) -> list[ImageSource]:
    """Files, folders (``recursive`` to descend) and glob patterns -> sorted image sources."""
    return find_images(paths, recursive, exclude, method_files).sources


def find_images(paths: Sequence[str | Path], recursive: bool = False, exclude: Path | None = None,
                method_files: Collection[str] = ()) -> Found:
    """Files, folders (``recursive`` to descend) and glob patterns -> sorted image sources.

    A file named explicitly is always taken (and fails later if it is no image): a FIFO or a broken
    link named on the command line becomes that image's error, not the run's. Folders and globs
    contribute regular files with an image suffix. ``exclude`` (the output folder) holds outputs,
    never inputs, whatever kind of input finds them (see :class:`_Outputs`; ``method_files``: the
    method names as camcli writes them in file names, given by the caller so that finding images
    does not depend on the method registry).
    Paths are kept as given: an image that is a symbolic link keeps its own name and folder in
    the outputs.
    """
    if not paths:
        raise UsageError("no input given: pass image files, folders or glob patterns")
    outputs = _Outputs(exclude, method_files) if exclude is not None else None
    found: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = _folder_images(p, recursive, skipped)
            if outputs is not None:
                files = [f for f in files if not outputs.holds(f, searched=p)]
            if not files:
                hint = "" if recursive else " (use -r/--recursive to look in subfolders)"
                raise UsageError(f"no images in folder {str(p)!r}{hint}; accepted types: {', '.join(IMAGE_SUFFIXES)}")
            found.extend(files)
        elif os.path.lexists(p):  # a file, or a FIFO, socket or broken link named on purpose
            if outputs is None or not outputs.holds(p, searched=p.parent):  # a shell's glob names outputs too
                found.append(p)
        elif glob.has_magic(str(raw)):
            hits = sorted(Path(h) for h in glob.glob(str(raw), recursive=recursive))
            files = [h for h in hits if h.is_file() and _is_image_name(h)]
            if outputs is not None:
                files = [f for f in files if not outputs.holds(f, searched=_glob_root(str(raw)))]
            skipped.extend(h for h in hits if _is_image_name(h) and not h.is_file() and not h.is_dir())
            if not files:
                raise UsageError(f"no images match {str(raw)!r}")
            found.extend(files)
        else:
            raise UsageError(f"no such file or folder: {str(raw)!r}")
    if not found:
        raise UsageError(f"no images to explain: every input given is an output in {str(exclude)!r}")
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(Path(os.path.abspath(f)), f)  # the same path twice, not the same target
    absolute = list(unique)
    root = Path(os.path.commonpath([a.parent for a in absolute]))
    return Found([ImageSource(path=unique[a], rel=a.relative_to(root)) for a in absolute], skipped)


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")


def _depth_range(img: Image.Image) -> tuple[float, float] | None:
    """How 16-bit, integer and float pixels map to 0..255: the whole image's range, so that the
    strips of one image are converted alike. None for 8-bit modes."""
    if img.mode not in _HIGH_DEPTH:
        return None
    lo, hi = img.getextrema()
    if img.mode == "F":
        return float(lo), float(hi)
    return 0.0, (65535.0 if hi > 255 else 255.0)  # 16-bit range -> 8-bit; small integers stay


def to_rgb8(img: Image.Image, depth: tuple[float, float] | None = None) -> np.ndarray:
    """Any PIL image (grey, RGBA, palette, 16-bit, float, CMYK) -> (H, W, 3) uint8 RGB.

    ``depth``: the (low, high) range of a 16-bit, integer or float image (default: its own)."""
    if img.mode in _HIGH_DEPTH:
        lo, hi = depth or _depth_range(img) or (0.0, 255.0)
        arr = np.asarray(img, dtype=np.float64)
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colours: composite onto white, as viewers show them.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def _to_rgb8_in_strips(img: Image.Image) -> np.ndarray:
    """to_rgb8 a strip of rows at a time into one uint8 buffer: the conversion's temporaries stay
    small whatever the image's size."""
    w, h = img.size
    if img.mode == "L":  # grey (scans, X-rays): one copy of the grey pixels, expanded in one pass
        return cv2.cvtColor(np.asarray(img), cv2.COLOR_GRAY2RGB)
    depth = _depth_range(img)
    rows = max(1, STRIP_PIXELS // max(1, w))
    if rows >= h:
        rgb = to_rgb8(img, depth)
        return rgb if rgb.flags.writeable else rgb.copy()
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, rows):
        out[y : y + rows] = to_rgb8(img.crop((0, y, w, min(h, y + rows))), depth)
    return out


def _regular_file(p: Path) -> os.stat_result:
    """stat() of an image file; ImageError for a broken link, a FIFO, a socket or a device (opening
    a FIFO would wait for a writer forever)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            raise ImageError(f"{p}: broken symbolic link (its target {os.readlink(p)!r} does not exist)") from None
        raise ImageError(f"{p}: no such file") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a folder" if stat.S_ISDIR(st.st_mode) else "a device")
        raise ImageError(f"{p}: not a regular file but {kind}; camcli reads image files")
    if st.st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    return st


def check_pixels(p: Path, width: int, height: int, max_pixels: int) -> None:
    """ImageError when an image is larger than --max-pixels, with its size and the way out."""
    if width * height > max_pixels:
        raise ImageError(
            f"{p}: {width}x{height} is {width * height:,} pixels, more than --max-pixels {max_pixels:,} "
            f"(decoding it takes about {width * height * 3 / 2**30:.1f} GiB); raise --max-pixels to read it"
        )


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # (H, W, 3) uint8 RGB, EXIF orientation applied
    frames: int = 1  # an animation's frames or a file's pages; only the first is decoded
    size: tuple[int, int] = (0, 0)  # (height, width) of the image in the file, even when decoded smaller

    @property
    def note(self) -> str | None:
        """What the summary records about how the image was read, if anything."""
        if self.frames > 1:
            return f"the file has {self.frames} frames (animation or pages); only the first was used"
        return None


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only; ImageError like read_image."""
    p = Path(path)
    with _open(p) as im:
        w, h = im.size
        check_pixels(p, w, h, max_pixels)
        return (h, w) if _swaps_sides(im) else (w, h)


def _swaps_sides(im: Image.Image) -> bool:
    return im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


# camcli checks --max-pixels itself, from the header and before decoding (see read_image), so a user
# who raises it can read the image; Pillow's fixed threshold would refuse it. Pillow's threshold is a
# process-wide setting: it is lifted only while camcli reads a file (one reader at a time), so the
# rest of a program that imports camcli keeps Pillow's protection.
_PILLOW_LIMIT = threading.Lock()


@contextmanager
def _open(p: Path) -> Iterator[Image.Image]:
    """The opened image, read inside the block with Pillow's own pixel limit lifted."""
    _regular_file(p)
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            try:
                im = Image.open(p)
            except UnidentifiedImageError:
                raise ImageError(
                    f"{p}: not an image, or a format camcli cannot read ({', '.join(IMAGE_SUFFIXES)})"
                ) from None
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"{p}: corrupt or truncated image ({e})") from None
            with im:
                yield im
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               fit: Callable[[int, int], tuple[int, int]] | None = None) -> Decoded:
    """Decode an image file as RGB with EXIF orientation applied; ImageError if it cannot be.

    The size is checked against ``max_pixels`` from the header, before any pixel is decoded. The
    decoded image is held once in its own mode and once as RGB (converted a strip at a time), never
    in float or in several full-size copies.

    ``fit(height, width) -> (h, w)``: the smallest size the caller needs (a model input, when no
    full-resolution overlay is drawn). An image of more than REDUCE_ABOVE pixels is then decoded
    smaller: a JPEG at a reduced scale (Pillow's draft), any other image reduced by an integer
    factor before it is converted to RGB. ``size`` keeps the file's own size.
    """
    p = Path(path)
    with _open(p) as im:
        try:
            w, h = im.size
            check_pixels(p, w, h, max_pixels)
            frames = int(getattr(im, "n_frames", 1) or 1)
            swapped = _swaps_sides(im)
            need = None
            if fit is not None and w * h > REDUCE_ABOVE:
                nh, nw = fit(w, h) if swapped else fit(h, w)
                need = (nw, nh) if swapped else (nh, nw)  # in the file's own orientation
                if im.format == "JPEG":
                    im.draft(im.mode, (need[1], need[0]))
            im.load()
            if need is not None:
                factor = min(im.size[0] // need[1], im.size[1] // need[0])
                if factor >= 2:
                    im = im.reduce(factor)
            ImageOps.exif_transpose(im, in_place=True)
            return Decoded(_to_rgb8_in_strips(im), frames, (w, h) if swapped else (h, w))
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{p}: corrupt or truncated image ({e})") from None


def decode(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB with EXIF orientation applied; ImageError if not."""
    return read_image(path, max_pixels).rgb


@dataclass(frozen=True)
class Preprocess:
    """Resize without cropping, to tensor, normalise.

    flexible=True: the shorter side becomes ``size`` and the aspect ratio is kept (models with global
    pooling). flexible=False: exactly size x size (models that need a fixed input).
    multiple: with flexible=True, both sides are rounded to a multiple of it (the patch size of a
    transformer that takes any size, so its token grid covers the whole image).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flexible: bool = True
    multiple: int = 1

    @property
    def policy(self) -> str:
        return "shorter-side" if self.flexible else "fixed"

    def input_hw(self, h: int, w: int) -> tuple[int, int]:
        if not self.flexible:
            return self.size, self.size
        m = max(1, self.multiple)

        def snap(v: float) -> int:
            return max(m, round(v / m) * m)

        if h <= w:
            return snap(self.size), snap(w * self.size / h)
        return snap(h * self.size / w), snap(self.size)

    def resize(self, rgb: np.ndarray, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) uint8 at the model's input size (4x less to move than floats).

        ``hw``: the input size, when ``rgb`` was decoded smaller than the file (read_image's fit)."""
        h, w = rgb.shape[:2]
        th, tw = hw or self.input_hw(h, w)
        interp = cv2.INTER_AREA if th * tw < h * w else cv2.INTER_CUBIC
        resized = cv2.resize(rgb, (tw, th), interpolation=interp)
        return torch.from_numpy(resized).permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) -> float32 (x / 255 - mean) / std, on the batch's device in one pass."""
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        scale = 1.0 / (255.0 * std)
        shift = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) / std
        return batch.float().mul_(scale).sub_(shift)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> normalised float (3, h, w)."""
        return self.normalize(self.resize(rgb)[None])[0]


def stack_images(images: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Resized (3, h, w) images of one size -> a (B, 3, h, w) batch in channels-last memory, in one copy.

    Preprocess.resize returns views of (h, w, 3) arrays: stacking them as they lie in memory gives the
    NHWC batch the engine feeds the model, instead of an NCHW copy converted back afterwards. For a
    CUDA ``device`` the batch is built in page-locked memory, so its copy to the GPU does not block.
    """
    hwc = [im.permute(1, 2, 0) for im in images]
    if not hwc:
        raise ValueError("stack_images: no images")
    pin = device is not None and device.type == "cuda"
    out = torch.empty((len(hwc), *hwc[0].shape), dtype=hwc[0].dtype, pin_memory=pin)
    return torch.stack(hwc, out=out).permute(0, 3, 1, 2)


def worker_ignores_interrupts(worker_id: int) -> None:
    """DataLoader worker_init_fn: the stop signals are the main process's to act on, and the worker
    dies with the main process (see camcli.signals.worker_init). A worker interrupted on its own
    would exit while its decoded images still fill the pipe, and the main process would wait
    seconds for each one."""
    from camcli.signals import worker_init

    worker_init(worker_id)
