"""Datasets: the embedded digits (and its 32x32 RGB form for CIFAR architectures), CIFAR-10/100
from a local python-pickle folder, and synthetic tensors for timing.

Images are kept in memory in [0, 1] (as uint8 for CIFAR: a quarter of the float size), and
normalised per batch with the dataset's mean/std, which travel in the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from abs_deploy.errors import UserError

DATASETS = ("digits", "digits32", "cifar10", "cifar100", "imagefolder", "synthetic")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# The files of the standard `cifar-*-python` archives and their MD5 sums (as published with them).
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", 10, b"labels", {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47d7c37eb",
        "test_batch": "40351d587109b95175f43aff81a1287e"}),
    "cifar100": ("cifar-100-python", 100, b"fine_labels", {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
}


@dataclass
class Dataset:
    name: str
    train_x: Tensor              # N x C x H x W, uint8 or float in [0, 1]
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    mean: list[float]
    std: list[float]
    augment: bool = False        # random crop (pad 4) + horizontal flip, the CIFAR recipe
    extra: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> list[int]:
        return [1, *self.val_x.shape[1:]]

    def input_spec(self) -> dict:
        return {"shape": self.input_shape, "mean": self.mean, "std": self.std,
                "dataset": self.name}

    def normalize(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                seed: int = 0, augment: bool | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised (x, y) batches; deterministic for a given seed."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.val_x, self.val_y)
        augment = self.augment and split == "train" if augment is None else augment
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x), generator=gen) if shuffle else torch.arange(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            if augment:
                xb = _crop_flip(xb, gen)
            yield self.normalize(xb), y[idx]

    def num_batches(self, split: str, batch_size: int) -> int:
        n = len(self.train_x) if split == "train" else len(self.val_x)
        return (n + batch_size - 1) // batch_size


def load_dataset(name: str, data_dir: str | None = None, verify: bool = True,
                 synthetic_shape: tuple[int, int, int] = (3, 32, 32),
                 synthetic_classes: int = 10, image_size: int = 32) -> Dataset:
    if name == "digits":
        return _digits(upsample=False)
    if name == "digits32":
        return _digits(upsample=True)
    if name in _CIFAR:
        if not data_dir:
            raise UserError(f"dataset {name} needs --data-dir (the folder holding "
                            f"{_CIFAR[name][0]}/ or its files)")
        return _cifar(name, Path(data_dir), verify)
    if name == "imagefolder":
        if not data_dir:
            raise UserError("dataset imagefolder needs --data-dir (one subfolder per class, "
                            "optionally under train/ and val/)")
        return _image_folder(Path(data_dir), image_size)
    if name == "synthetic":
        return _synthetic(synthetic_shape, synthetic_classes)
    raise UserError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")


def dataset_for(input_spec: dict, data_dir: str | None = None, name: str | None = None
                ) -> Dataset:
    """The dataset a checkpoint was trained on (or `name`), at the input size it records."""
    shape = input_spec.get("shape", [1, 3, 32, 32])
    return load_dataset(name or input_spec.get("dataset", "digits"), data_dir,
                        synthetic_shape=tuple(shape[1:]), image_size=int(shape[-1]))


def _digits(upsample: bool) -> Dataset:
    from abs_deploy.digits_split import TRAIN, VAL

    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    # Fixed stratified split: 1,437 train / 360 val, the same on every machine.
    tr, va = torch.tensor(TRAIN), torch.tensor(VAL)
    if upsample:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = x.clamp(0, 1).repeat(1, 3, 1, 1)
    mean = x[tr].mean(dim=(0, 2, 3)).tolist()
    std = x[tr].std(dim=(0, 2, 3)).tolist()
    return Dataset("digits32" if upsample else "digits", x[tr], y[tr], x[va], y[va], 10,
                   mean, std, augment=False)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (8x8 images, values 0-16, and labels), read from its CSV
    without importing scikit-learn, whose import costs more than everything else here."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders), None)
    if path is None or not path.is_file():
        raise UserError("the embedded digits dataset needs scikit-learn installed "
                        "(pip install scikit-learn)")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _cifar(name: str, root: Path, verify: bool) -> Dataset:
    folder, num_classes, label_key, files = _CIFAR[name]
    base = root / folder if (root / folder).is_dir() else root
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        raise UserError(f"{name}: {base} lacks {', '.join(missing)} (expected the "
                        f"{folder}/ layout of the python version)")
    if verify:
        for fname, md5 in files.items():
            got = hashlib.md5((base / fname).read_bytes()).hexdigest()
            if got != md5:
                raise UserError(f"{name}: {base / fname} has MD5 {got}, expected {md5} "
                                "(corrupt or not the official file; --no-verify to skip)")
    train = [f for f in files if f.startswith(("data_batch", "train"))]
    test = [f for f in files if f.startswith("test")]
    tx, ty = _read_batches(base, train, label_key)
    vx, vy = _read_batches(base, test, label_key)
    mean = (tx.float().mean(dim=(0, 2, 3)) / 255).tolist()
    std = (tx.float().std(dim=(0, 2, 3)) / 255).tolist()
    return Dataset(name, tx, ty, vx, vy, num_classes, mean, std, augment=True)


def _read_batches(base: Path, names: list[str], label_key: bytes) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for n in names:
        with open(base / n, "rb") as f:
            try:
                d = _SafeUnpickler(f, encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise UserError(f"{base / n}: not a CIFAR python batch ({e})") from None
        if b"data" not in d or label_key not in d:
            raise UserError(f"{base / n}: not a CIFAR python batch (no data/labels)")
        xs.append(torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8)))
        ys.append(torch.tensor(d[label_key], dtype=torch.long))
    return torch.cat(xs).view(-1, 3, 32, 32), torch.cat(ys)


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: allow only the numpy array reconstruction they need, so a
    doctored file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _image_folder(root: Path, size: int) -> Dataset:
    """Images in one subfolder per class, as `root/train/<class>/` and `root/val/<class>/`, or
    `root/<class>/` split 80/20 per class with a fixed seed. Each image is resized (shorter side)
    and centre-cropped to `size` once, on load, and kept in memory as uint8."""
    if not root.is_dir():
        raise UserError(f"imagefolder: {root} is not a folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = _class_names(root / "train")
        tx, ty = _read_images(root / "train", classes, size)
        vx, vy = _read_images(root / "val", classes, size)
    else:
        classes = _class_names(root)
        x, y = _read_images(root, classes, size)
        gen = torch.Generator().manual_seed(0)
        val_idx = []
        for c in range(len(classes)):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            val_idx.append(idx[:max(1, len(idx) // 5)])
        is_val = torch.zeros(len(y), dtype=torch.bool)
        is_val[torch.cat(val_idx)] = True
        tx, ty, vx, vy = x[~is_val], y[~is_val], x[is_val], y[is_val]
    if len(tx) == 0 or len(vx) == 0:
        raise UserError(f"imagefolder: {root} needs images for both training and validation")
    mean = (tx.float().mean(dim=(0, 2, 3)) / 255).tolist()
    std = (tx.float().std(dim=(0, 2, 3)) / 255).clamp_min(1e-3).tolist()
    ds = Dataset("imagefolder", tx, ty, vx, vy, len(classes), mean, std, augment=True)
    ds.extra["classes"] = classes
    return ds


def _class_names(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"imagefolder: {folder} has no class subfolders")
    return classes


def _read_images(folder: Path, classes: list[str], size: int) -> tuple[Tensor, Tensor]:
    from PIL import Image, UnidentifiedImageError

    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for f in files:
            try:
                with Image.open(f) as img:
                    img = img.convert("RGB")
                    scale = size / min(img.size)
                    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
                    img = img.resize((w, h), Image.BILINEAR)
                    left, top = (w - size) // 2, (h - size) // 2
                    img = img.crop((left, top, left + size, top + size))
                    arr = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"imagefolder: cannot read {f}: {e}") from None
            xs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            ys.append(label)
    if not xs:
        raise UserError(f"imagefolder: no images under {folder}")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _synthetic(shape: tuple[int, int, int], num_classes: int, n_train: int = 256,
               n_val: int = 64) -> Dataset:
    """Random images: for timing only, accuracy on them means nothing."""
    gen = torch.Generator().manual_seed(0)
    tx = torch.rand(n_train, *shape, generator=gen)
    vx = torch.rand(n_val, *shape, generator=gen)
    ty = torch.randint(0, num_classes, (n_train,), generator=gen)
    vy = torch.randint(0, num_classes, (n_val,), generator=gen)
    c = shape[0]
    return Dataset("synthetic", tx, ty, vx, vy, num_classes, [0.5] * c, [0.29] * c)


def _crop_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        img = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = img.flip(-1) if flip[i] else img
    return out
