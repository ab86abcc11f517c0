"""Datasets: the embedded digits (and its 32x32 RGB form for CIFAR architectures),
Fashion-MNIST from its four idx files, CIFAR-10/100 from a local python-pickle folder, image
folders, and synthetic tensors for timing.

Every dataset has three splits (DESIGN §12): `train` (weights), `val` (everything that chooses:
best epoch, controllers) carved from the training data with a fixed seed, and `test` (what is
reported), which nothing that chooses ever reads.

Every split is read through a `torch.utils.data.DataLoader` (`Dataset.on(device, workers=N)`),
a batch at a time, and sharded over ranks like DistributedSampler. The embedded, Fashion-MNIST,
CIFAR and synthetic images are kept in memory in [0, 1] (as uint8 for CIFAR and Fashion-MNIST: a
quarter of the float size); an image folder keeps only its file list and labels and decodes each
image in the loader's workers (`abs_deploy.images`), so memory does not grow with its size.
Batches are normalised with the dataset's mean/std, which travel in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import pickle
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from abs_deploy.errors import UserError
from abs_deploy.images import ImageFiles, list_images, uniforms

DATASETS = ("digits", "digits32", "fashion-mnist", "cifar10", "cifar100", "imagefolder",
            "synthetic")
SPLITS = ("train", "val", "test")
# Where Debian's `dataset-fashion-mnist` package puts the four idx files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_VAL = 5000
CIFAR_VAL = 5000
DIGITS_VAL = 240
# Fashion-MNIST's four idx files: (images, labels) per split, with the count and the SHA-256 of
# the decompressed content (Debian recompresses the .gz files, so their own digests differ from
# the published ones; the content is the same 60,000 + 10,000 images).
_FASHION = {
    "train": (("train-images-idx3-ubyte.gz", 60000,
               "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
              ("train-labels-idx1-ubyte.gz", 60000,
               "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9")),
    "test": (("t10k-images-idx3-ubyte.gz", 10000,
              "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
             ("t10k-labels-idx1-ubyte.gz", 10000,
              "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")),
}
# A streamed folder's mean/std are estimated from this many training images (_folder_mean_std).
MEAN_STD_SAMPLE = 256

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
    train_x: Tensor | None       # N x C x H x W, uint8 or float in [0, 1]; None when streamed
    train_y: Tensor
    val_x: Tensor | None         # carved from the training data: what chooses reads this
    val_y: Tensor
    test_x: Tensor | None        # what is reported; nothing that chooses ever reads it
    test_y: Tensor
    num_classes: int
    mean: list[float]
    std: list[float]
    augment: bool = False        # training views: CIFAR's crop + flip, a folder's resized crop
    extra: dict = field(default_factory=dict)
    device: str = "cpu"          # where `batches` delivers; the data itself stays where it is
    files: ImageFiles | None = None   # a streamed folder: its images, read per item
    workers: int = 0             # DataLoader worker processes (0: read in this process)

    def on(self, device: str, workers: int | None = None) -> Dataset:
        """The same data, its batches delivered on `device` (see `device.resolve_device`) and
        read by `workers` DataLoader processes (default: as now)."""
        if workers is not None and workers < 0:
            raise UserError(f"workers must be 0 or more, got {workers}")
        return dataclasses.replace(self, device=device,
                                   workers=self.workers if workers is None else workers)

    @property
    def input_shape(self) -> list[int]:
        if self.files is not None:
            return [1, 3, self.files.size, self.files.size]
        return [1, *self.test_x.shape[1:]]

    def split(self, name: str) -> tuple[Tensor | None, Tensor]:
        """(images, labels) of split `name`; images are None for a streamed folder."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; known: {', '.join(SPLITS)}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def split_sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)[1]) for name in SPLITS}

    def input_spec(self) -> dict:
        return {"shape": self.input_shape, "mean": self.mean, "std": self.std,
                "dataset": self.name}

    def normalize(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                augment: bool | None = None, rank: int = 0,
                world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised (x, y) batches of `split` on `self.device`: rank `rank`'s share of
        `world`. `batch_size` is the global batch (each rank takes batch_size / world). Shuffled
        (training), the order is DistributedSampler's for `seed` (with world 1: `randperm`
        seeded with `seed`); in order (evaluation), rank r takes images r, r + world, ... and
        every image is read exactly once over the ranks. Deterministic for a given seed,
        whatever the number of workers."""
        augment = self.augment and split == "train" if augment is None else augment
        key = (split, batch_size, shuffle, augment, rank, world)
        # Out of the cache while in use: a second reader of the same key gets its own loader
        # instead of restarting this one's persistent workers mid-epoch.
        cache = self._loaders()
        loader = cache.pop(key, None) or self._loader(*key)
        loader.sampler.seed = seed
        try:
            for item in loader:
                if isinstance(item, _Unreadable):
                    raise UserError(item.message)
                x, y = item
                x = x.to(self.device, non_blocking=True)
                yield self.normalize(x), y.to(self.device, non_blocking=True)
        finally:
            cache[key] = loader

    def num_batches(self, split: str, batch_size: int, world: int = 1) -> int:
        """Steps of one training epoch (shuffled batches) per rank."""
        shard = -(-len(self.split(split)[1]) // world)
        return -(-shard // _per_rank(batch_size, world, shuffle=True))

    def _loaders(self) -> dict[tuple, DataLoader]:
        """This Dataset's DataLoaders by (split, batch size, shuffle, augment, rank, world),
        kept so that persistent workers start once, not every epoch. A `replace`d Dataset
        (other tensors, device, workers) gets its own."""
        loaders = _LOADERS.get(id(self))
        if loaders is None:
            loaders = _LOADERS[id(self)] = {}
            weakref.finalize(self, _LOADERS.pop, id(self), None)
        return loaders

    def _loader(self, split: str, batch_size: int, shuffle: bool, augment: bool, rank: int,
                world: int) -> DataLoader:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} ranks")
        x, y = self.split(split)
        reader = (_TensorBatches(x, y, augment) if self.files is None
                  else _FileBatches(self.files, split, y, augment))
        sampler = _BatchSampler(len(y), _per_rank(batch_size, world, shuffle), shuffle, rank,
                                world)
        # batch_size=None: the sampler hands the reader a whole batch of indices, so in-memory
        # sets are indexed a batch at a time and a folder is decoded item by item in a worker.
        # A generator of its own: by default every new iterator draws its workers' base seed
        # from torch's global RNG, so reading data would change what a model initialised
        # afterwards looks like (randomness here comes from the seeds in the batches instead).
        return DataLoader(reader, batch_size=None, sampler=sampler, num_workers=self.workers,
                          pin_memory=self.device.startswith("cuda"),
                          persistent_workers=self.workers > 0,
                          generator=torch.Generator().manual_seed(0))


def load_dataset(name: str, data_dir: str | None = None, verify: bool = True,
                 synthetic_shape: tuple[int, int, int] = (3, 32, 32),
                 synthetic_classes: int = 10, image_size: int = 32) -> Dataset:
    if name == "digits":
        return _digits(upsample=False)
    if name == "digits32":
        return _digits(upsample=True)
    if name == "fashion-mnist":
        return _fashion_mnist(Path(data_dir) if data_dir else FASHION_MNIST_DIR, verify)
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
    # The fixed stratified 1,437 / 360 split of scikit-learn: its 360 are the test split, and
    # the validation split is carved out of the 1,437 (DIGITS_VAL of them, per class).
    tr, te = torch.tensor(TRAIN), torch.tensor(VAL)
    fit, val = carve_validation(y[tr], DIGITS_VAL)
    tr, va = tr[fit], tr[val]
    if upsample:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = x.clamp(0, 1).repeat(1, 3, 1, 1)
    mean = x[tr].mean(dim=(0, 2, 3)).tolist()
    std = x[tr].std(dim=(0, 2, 3)).tolist()
    return Dataset("digits32" if upsample else "digits", x[tr], y[tr], x[va], y[va], x[te], y[te],
                   10, mean, std, augment=False)


def carve_validation(y: Tensor, n_val: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, val) into `y`: `n_val` images taken per class in proportion to its size,
    at random with a fixed seed, so the split is the same on every machine. Both sorted."""
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(y, return_counts=True)
    # Largest remainder: the shares add up to n_val exactly; every class keeps a training image.
    quota = n_val * counts.double() / len(y)
    share = quota.floor().long()
    for i in torch.argsort(quota - share, descending=True)[:n_val - int(share.sum())]:
        share[i] += 1
    share = torch.minimum(share, counts - 1)
    picked = []
    for c, k in zip(classes.tolist(), share.tolist(), strict=True):
        idx = torch.nonzero(y == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[torch.cat(picked)] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


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
                                "(corrupt or not the official file)")
    train = [f for f in files if f.startswith(("data_batch", "train"))]
    test = [f for f in files if f.startswith("test")]
    x, y = _read_batches(base, train, label_key)
    test_x, test_y = _read_batches(base, test, label_key)
    return _with_validation(name, x, y, test_x, test_y, num_classes,
                            min(CIFAR_VAL, len(y) // 10), augment=True)


def _with_validation(name: str, x: Tensor, y: Tensor, test_x: Tensor, test_y: Tensor,
                     num_classes: int, n_val: int, augment: bool) -> Dataset:
    """The training images split into train and `n_val` validation images; mean/std from the
    train part."""
    fit, val = carve_validation(y, n_val)
    tx = x[fit]
    mean = (tx.float().mean(dim=(0, 2, 3)) / 255).tolist()
    std = (tx.float().std(dim=(0, 2, 3)) / 255).clamp_min(1e-3).tolist()
    return Dataset(name, tx, y[fit], x[val], y[val], test_x, test_y, num_classes, mean, std,
                   augment=augment)


def _fashion_mnist(root: Path, verify: bool) -> Dataset:
    """The four standard idx files (gzip), from `root` (default: Debian's package folder)."""
    names = [f for pair in _FASHION.values() for f, _, _ in pair]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        hint = (" (apt-get install dataset-fashion-mnist puts them in "
                f"{FASHION_MNIST_DIR})" if root == FASHION_MNIST_DIR else "")
        raise UserError(f"fashion-mnist: {root} lacks {', '.join(missing)}{hint}")
    arrays = {}
    for split, ((img_file, count, img_sha), (lbl_file, _, lbl_sha)) in _FASHION.items():
        images = read_idx(root / img_file, ndim=3, count=count,
                          sha256=img_sha if verify else None)
        labels = read_idx(root / lbl_file, ndim=1, count=count,
                          sha256=lbl_sha if verify else None)
        if images.shape[1:] != (28, 28):
            raise UserError(f"fashion-mnist: {root / img_file} holds {images.shape[1]}x"
                            f"{images.shape[2]} images, expected 28x28")
        if labels.max() > 9:
            raise UserError(f"fashion-mnist: {root / lbl_file} has label {labels.max()}; "
                            "expected 0-9")
        arrays[split] = (torch.from_numpy(images.copy()).unsqueeze(1),
                         torch.from_numpy(labels.astype(np.int64)))
    (x, y), (test_x, test_y) = arrays["train"], arrays["test"]
    return _with_validation("fashion-mnist", x, y, test_x, test_y, 10, FASHION_MNIST_VAL,
                            augment=False)


_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path, ndim: int, count: int | None = None,
             sha256: str | None = None) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzip-compressed or not): a 4-byte magic number
    (0, 0, type 0x08 = uint8, number of dimensions), one big-endian uint32 per dimension, then
    the data. Checks the magic, the sizes against the header, `count` items and `sha256` of the
    decompressed content; any mismatch is a one-line UserError naming the file."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: cannot read it as an idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES \
            or raw[3] != ndim:
        raise UserError(f"{path}: not an idx file of {ndim} dimension(s) (magic number "
                        f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError(f"{path}: {len(raw)} bytes where the header ({' x '.join(map(str, dims))})"
                        f" needs {expected}: truncated or padded")
    if count is not None and dims[0] != count:
        raise UserError(f"{path}: holds {dims[0]} items, expected {count}")
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise UserError(f"{path}: content checksum differs from the published Fashion-MNIST "
                        "files (corrupt, or another dataset)")
    dtype = _IDX_DTYPES[raw[2]]
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


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
    """Images in one subfolder per class, as `root/train/<class>/` and `root/val/<class>/` (the
    ImageNet layout: `val/` is what is reported, so it is the test split, and a tenth of
    `train/` is carved out for validation), or `root/<class>/`, split 70/10/20 per class with a
    fixed seed. Streamed: only the file list and labels are read here; each image is decoded
    when a batch needs it (`abs_deploy.images`)."""
    if not root.is_dir():
        raise UserError(f"imagefolder: {root} is not a folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes = _class_names(root / "train")
        files, y = list_images(root / "train", classes, root)
        test_files, test_y = list_images(root / "val", classes, root)
    else:
        classes = _class_names(root)
        files, y = list_images(root, classes, root)
        rest, test = carve_validation(y, len(y) // 5, seed=1)
        files, y, test_files, test_y = files[rest.numpy()], y[rest], files[test.numpy()], y[test]
    if len(classes) < 2:
        raise UserError(f"imagefolder: {root} has one class ({classes[0]}); a classifier needs "
                        "two or more class subfolders")
    fit, val = carve_validation(y, max(len(classes), len(y) // 10))
    labels = {"train": y[fit], "val": y[val], "test": test_y}
    for name, split_y in labels.items():
        if len(split_y) == 0:
            raise UserError(f"imagefolder: {root} has too few images to fill the {name} split "
                            "(each class needs at least 3 images)")
    images = ImageFiles(str(root), {"train": files[fit.numpy()], "val": files[val.numpy()],
                                    "test": test_files}, size)
    mean, std = _folder_mean_std(images)
    return Dataset("imagefolder", None, labels["train"], None, labels["val"], None, test_y,
                   len(classes), mean, std, augment=True, files=images,
                   extra={"classes": classes})


def _class_names(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"imagefolder: {folder} has no class subfolders")
    return classes


def _folder_mean_std(images: ImageFiles) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training split, estimated (reading every image would
    cost a pass over the whole folder at every load) from a fixed sample: the first
    MEAN_STD_SAMPLE of a permutation seeded with 0, in their evaluation view. Running sums, so
    the sample is never held whole either."""
    n = len(images.files["train"])
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:MEAN_STD_SAMPLE]
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for i in sorted(pick.tolist()):
        x = images.load("train", i).double().div_(255).flatten(1)
        total += x.sum(1)
        squares += x.square().sum(1)
    count = len(pick) * images.size ** 2
    mean = total / count
    var = (squares - count * mean.square()) / max(count - 1, 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


def _synthetic(shape: tuple[int, int, int], num_classes: int, n_train: int = 256,
               n_val: int = 64, n_test: int = 64) -> Dataset:
    """Random images: for timing and export checks only, accuracy on them means nothing. The
    test split is drawn where the two-split loader drew its validation images, so the export
    checks that validate on it see the same images as before the split."""
    gen = torch.Generator().manual_seed(0)
    tx = torch.rand(n_train, *shape, generator=gen)
    ex = torch.rand(n_test, *shape, generator=gen)
    ty = torch.randint(0, num_classes, (n_train,), generator=gen)
    ey = torch.randint(0, num_classes, (n_test,), generator=gen)
    vx = torch.rand(n_val, *shape, generator=gen)
    vy = torch.randint(0, num_classes, (n_val,), generator=gen)
    c = shape[0]
    return Dataset("synthetic", tx, ty, vx, vy, ex, ey, num_classes, [0.5] * c, [0.29] * c)


def _crop_flip(x: Tensor, u: np.ndarray) -> Tensor:
    """The CIFAR recipe: pad 4, a random crop back to the image size, a horizontal flip at
    p = 0.5; three numbers of `u` (in [0, 1)) per image decide them."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = (u[:, 0] * 9).astype(int), (u[:, 1] * 9).astype(int)
    out = torch.empty_like(x)
    for i in range(n):
        img = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = img.flip(-1) if u[i, 2] < 0.5 else img
    return out


# --- reading through a DataLoader ---------------------------------------------------------

# Outside the Dataset, dropped when it dies: a Dataset freed by the cycle collector (a traceback
# holding it, say) would take its loaders along, and the collector closes their queues before
# telling the workers to stop, so each worker waits out its 5 s poll before it exits.
_LOADERS: dict[int, dict[tuple, DataLoader]] = {}


def _per_rank(batch_size: int, world: int, shuffle: bool) -> int:
    """Each rank's share of a global batch. Training needs it exact (the ranks' batches together
    are the single-process batch); evaluation counts images whatever the batch, so rounds up."""
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch size {batch_size} over {world} ranks")
    if shuffle and batch_size % world:
        raise UserError(f"batch size {batch_size} does not split evenly over {world} processes")
    return -(-batch_size // world)


class _BatchSampler(Sampler):
    """One rank's batches of image indices, each paired with the epoch's seed: the reader
    needs the seed for augmentation, and a worker process learns it only this way."""

    def __init__(self, n: int, per_rank: int, shuffle: bool, rank: int, world: int) -> None:
        # Shuffled: DistributedSampler (its epoch-0 order for seed s is randperm seeded with s,
        # padded by repetition to a multiple of world). In order: no padding, so summing over
        # ranks counts every image once.
        self.order = (DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                         drop_last=False) if shuffle else range(rank, n, world))
        self.per_rank, self.seed = per_rank, 0

    def __len__(self) -> int:
        return -(-len(self.order) // self.per_rank)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        seed = self.seed
        if isinstance(self.order, DistributedSampler):
            self.order.seed = seed
        order = list(self.order)
        return ((seed, order[i:i + self.per_rank]) for i in range(0, len(order), self.per_rank))


class _TensorBatches(torch.utils.data.Dataset):
    """An in-memory split, indexed a batch at a time: `[(seed, indices)]` -> (x, y)."""

    def __init__(self, x: Tensor, y: Tensor, augment: bool) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, batch: tuple[int, list[int]]) -> tuple[Tensor, Tensor]:
        seed, indices = batch
        idx = torch.tensor(indices, dtype=torch.long)
        x = self.x[idx]
        if self.augment:
            x = _crop_flip(x, uniforms(seed, indices, 3))
        return x, self.y[idx]


@dataclass
class _Unreadable:
    """What a reader returns for a batch with an unreadable file: a worker's exception reaches
    the main process wrapped in a traceback, and the user is owed one line naming the file."""

    message: str


class _FileBatches(torch.utils.data.Dataset):
    """A streamed split, decoded item by item: `[(seed, indices)]` -> (uint8 x, y)."""

    def __init__(self, files: ImageFiles, split: str, y: Tensor, augment: bool) -> None:
        self.files, self.split, self.y, self.augment = files, split, y, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, batch: tuple[int, list[int]]) -> tuple[Tensor, Tensor] | _Unreadable:
        seed, indices = batch
        try:
            x = torch.stack([self.files.load(self.split, i, seed if self.augment else None)
                             for i in indices])
        except UserError as e:
            return _Unreadable(str(e))
        return x, self.y[torch.tensor(indices, dtype=torch.long)]
