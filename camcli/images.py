"""Finding images, decoding them robustly, and preprocessing them without cropping."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from camcli.errors import ImageError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Decoding huge images is legitimate here (scans, satellite tiles); keep a cap against bombs.
Image.MAX_IMAGE_PIXELS = 400_000_000


@dataclass(frozen=True)
class ImageSource:
    path: Path  # as found on disk
    rel: Path  # path relative to the common root of all inputs: mirrored under --out


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def discover(paths: Sequence[str | Path], recursive: bool = False, exclude: Path | None = None) -> list[ImageSource]:
    """Files, folders (``recursive`` to descend) and glob patterns -> sorted image sources.

    A file named explicitly is always taken (and fails later if it is no image); folders and globs
    contribute files with an image suffix. ``exclude`` (the output folder) is never read.
    """
    if not paths:
        raise UsageError("no input given: pass image files, folders or glob patterns")
    excl = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            files = sorted(f for f in it if f.is_file() and _is_image_name(f))
            if excl is not None:
                files = [f for f in files if excl not in f.resolve().parents]
            if not files:
                hint = "" if recursive else " (use -r/--recursive to look in subfolders)"
                raise UsageError(f"no images in folder {str(p)!r}{hint}; accepted types: {', '.join(IMAGE_SUFFIXES)}")
            found.extend(files)
        elif glob.has_magic(str(raw)):
            hits = sorted(Path(h) for h in glob.glob(str(raw), recursive=recursive))
            files = [h for h in hits if h.is_file() and _is_image_name(h)]
            if not files:
                raise UsageError(f"no images match {str(raw)!r}")
            found.extend(files)
        else:
            raise UsageError(f"no such file or folder: {str(raw)!r}")
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(f.resolve(), f)
    resolved = list(unique)
    root = Path(os.path.commonpath([r.parent for r in resolved]))
    return [ImageSource(path=unique[r], rel=r.relative_to(root)) for r in resolved]


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL image (grey, RGBA, palette, 16-bit, float, CMYK) -> (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        elif arr.max() > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        grey = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colours: composite onto white, as viewers show them.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def decode(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB with EXIF orientation applied; ImageError if not."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise ImageError(f"{p}: empty file (0 bytes)")
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return to_rgb8(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image, or a format camcli cannot read ({', '.join(IMAGE_SUFFIXES)})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{p}: corrupt or truncated image ({e})") from None


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

    def resize(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) uint8 at the model's input size (4x less to move than floats)."""
        h, w = rgb.shape[:2]
        th, tw = self.input_hw(h, w)
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


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and resizes in DataLoader workers; a bad file yields an error record.

    Items carry uint8 tensors: the pipeline normalises whole batches on the compute device.
    """

    def __init__(self, sources: Sequence[ImageSource], preprocess: Preprocess) -> None:
        self.sources = list(sources)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            rgb = decode(self.sources[i].path)
            return {"index": i, "image": rgb, "tensor": self.preprocess.resize(rgb), "error": None}
        except ImageError as e:
            return {"index": i, "image": None, "tensor": None, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a batch run
            return {"index": i, "image": None, "tensor": None, "error": f"{self.sources[i].path}: {e}"}


def collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items
