"""Image folders read from disk one image at a time, and the random numbers of augmentation.

A streamed folder keeps only its file list and labels in memory (`ImageFiles`); each image is
decoded when a batch asks for it, with the usual ImageNet transforms: a random-resized crop and
a horizontal flip for training, resize and centre crop for evaluation. PIL does the work
(torchvision is not a dependency).

Augmentation draws its numbers from `uniforms(seed, image index)`, never from a generator's
state, so an image's crop is the same whichever worker process, rank or batch reads it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from abs_deploy.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Evaluation resizes the shorter side to size / 0.875 and keeps the centre: ImageNet's 224 of 256.
EVAL_CROP = 0.875
# RandomResizedCrop as in Inception (Szegedy et al. 2015) and torchvision: a crop of 8-100% of
# the area with aspect ratio 3/4-4/3, ten tries, then the centre crop.
CROP_SCALE = (0.08, 1.0)
CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_TRIES = 10
# Numbers one training view uses: (area, ratio, top, left) per try, then the flip.
TRAIN_UNIFORMS = 4 * CROP_TRIES + 1


@dataclass(frozen=True)
class ImageFiles:
    """A streamed image folder: each split's image paths relative to `root`, decoded to
    `size` x `size` on demand. The paths are one numpy bytes array per split rather than a list
    of str: a forked DataLoader worker that reads a list's strings touches their reference
    counts and so copies the pages they live on, which grows every worker by the list's size."""

    root: str
    files: dict[str, np.ndarray]
    size: int

    def path(self, split: str, index: int) -> Path:
        return Path(self.root, os.fsdecode(self.files[split][index]))

    def load(self, split: str, index: int, seed: int | None = None) -> Tensor:
        """Image `index` of `split` as uint8 3 x size x size: the training view drawn from
        (`seed`, `index`), or the evaluation view when `seed` is None."""
        u = None if seed is None else uniforms(seed, [index], TRAIN_UNIFORMS)[0]
        return load_image(self.path(split, index), self.size, u)


def list_images(folder: Path, classes: list[str], root: Path) -> tuple[np.ndarray, Tensor]:
    """Image files under `folder/<class>/` (any depth; by suffix, sorted), as paths relative to
    `root`, and their labels (the class's position in `classes`)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [os.fsencode(p.relative_to(root)) for p in found]
        labels += [label] * len(found)
    if not paths:
        raise UserError(f"imagefolder: no images under {folder}")
    return np.array(paths, dtype=bytes), torch.tensor(labels, dtype=torch.long)


def load_image(path: Path, size: int, u: np.ndarray | None = None) -> Tensor:
    """`path` decoded to RGB as uint8 3 x size x size: a random-resized crop and flip drawn from
    `u` (`TRAIN_UNIFORMS` numbers in [0, 1)), or with `u` None the evaluation view. A file PIL
    cannot read is a one-line UserError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            view = eval_view(img, size) if u is None else train_view(img, size, u)
            arr = np.asarray(view, dtype=np.uint8)
    # PIL reports a damaged file as OSError, SyntaxError or ValueError depending on the format.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"imagefolder: cannot read {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def eval_view(img, size: int):
    """Shorter side resized to size / EVAL_CROP, then the centre size x size."""
    from PIL import Image

    short = round(size / EVAL_CROP)
    scale = short / min(img.size)
    w, h = max(short, round(img.width * scale)), max(short, round(img.height * scale))
    img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def train_view(img, size: int, u: np.ndarray):
    """A random-resized crop to size x size and a horizontal flip at p = 0.5, drawn from `u`."""
    from PIL import Image

    left, top, w, h = crop_box(img.width, img.height, u)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if u[-1] < 0.5 else img


def crop_box(width: int, height: int, u: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, w, h) of RandomResizedCrop's box: the first of CROP_TRIES random boxes that
    fits in the image, else the centre crop at the nearest allowed aspect ratio."""
    area = width * height
    for k in range(CROP_TRIES):
        s, r, a, b = u[4 * k:4 * k + 4]
        target = area * (CROP_SCALE[0] + s * (CROP_SCALE[1] - CROP_SCALE[0]))
        ratio = math.exp(CROP_LOG_RATIO[0] + r * (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(b * (width - w + 1)), int(a * (height - h + 1)), w, h
    lo, hi = (math.exp(v) for v in CROP_LOG_RATIO)
    w, h = width, height
    if width / height < lo:
        h = round(width / lo)
    elif width / height > hi:
        w = round(height * hi)
    return (width - w) // 2, (height - h) // 2, w, h


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seed: int, index: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """`k` numbers in [0, 1) for each image index (shape len(index) x k): a hash of (seed,
    index, j), so they depend on the seed and the image alone, not on who reads it or when."""
    idx = np.asarray(index, dtype=np.uint64).reshape(-1, 1)
    counter = idx * np.uint64(k) + np.arange(k, dtype=np.uint64)
    offset = _mix(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    z = _mix((counter + np.uint64(1)) * _GOLDEN + offset)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014): a bijection of uint64 whose outputs
    for consecutive inputs look independent. Wraps modulo 2**64, as intended."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
