import hashlib
import pickle

import numpy as np
import pytest
import torch

from abs_deploy.data import load_dataset
from abs_deploy.errors import UserError


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.split_sizes() == {"train": 1197, "val": 240, "test": 360}
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    val_counts = torch.bincount(digits.val_y, minlength=10)
    assert val_counts.min() >= 22 and val_counts.max() <= 26
    again = load_dataset("digits")
    assert torch.equal(again.val_x, digits.val_x) and torch.equal(again.test_x, digits.test_x)


def test_validation_is_carved_from_train_and_disjoint_from_test(digits):
    """Nothing that chooses may see the test images: validation comes out of the training data,
    and no image is in two splits."""
    rows = {name: {tuple(x.flatten().tolist()) for x in digits.split(name)[0]}
            for name in ("train", "val", "test")}
    assert not rows["val"] & rows["test"] and not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]


def test_normalised_batches_have_zero_mean_unit_std(digits):
    x = torch.cat([b for b, _ in digits.batches("train", 512)])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_shuffled_batches_are_deterministic_per_seed(digits):
    a = next(digits.batches("train", 8, shuffle=True, seed=3))[1]
    b = next(digits.batches("train", 8, shuffle=True, seed=3))[1]
    c = next(digits.batches("train", 8, shuffle=True, seed=4))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_digits32_is_rgb_32x32_of_the_same_images():
    d = load_dataset("digits32")
    assert d.train_x.shape[1:] == (3, 32, 32) and len(d.test_y) == 360


def _fake_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 4)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar_with_wrong_md5_is_refused(tmp_path):
    _fake_cifar10(tmp_path)
    with pytest.raises(UserError, match="MD5"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar_layout_reads_without_verification(tmp_path):
    _fake_cifar10(tmp_path)
    d = load_dataset("cifar10", str(tmp_path), verify=False)
    assert d.split_sizes() == {"train": 18, "val": 2, "test": 4}
    assert d.train_x.shape[1:] == (3, 32, 32) and d.train_x.dtype == torch.uint8
    x, _ = next(d.batches("train", 8))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = _fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(UserError, match="refused to load"):
        load_dataset("cifar10", str(tmp_path), verify=False)


class _Evil:
    def __reduce__(self):
        return (print, ("ran",))


def test_missing_cifar_files_are_named(tmp_path):
    with pytest.raises(UserError, match="lacks data_batch_1"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar_without_data_dir_says_so():
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("cifar100")


def test_md5_table_is_checked_against_real_bytes(tmp_path):
    # The check must hash file contents: equal bytes give the same digest.
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert hashlib.md5(p.read_bytes()).hexdigest() == "900150983cd24fb0d6963f7d28e17f72"


def _image_folder(root, classes=("cat", "dog"), per_class=5):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (20 + i, 30, 3), dtype=np.uint8) + 150 * c
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_image_folder_splits_per_class_and_resizes(tmp_path):
    d = load_dataset("imagefolder", str(_image_folder(tmp_path)), image_size=16)
    assert d.num_classes == 2 and d.extra["classes"] == ["cat", "dog"]
    assert d.input_shape == [1, 3, 16, 16]
    assert d.split_sizes() == {"train": 6, "val": 2, "test": 2}
    assert torch.bincount(d.test_y).tolist() == [1, 1]
    x, y = next(d.batches("train", 6, augment=False))
    assert x.shape == (6, 3, 16, 16)
    # class 1 images are brighter: the labels travel with their pixels
    assert x[y == 1].mean() > x[y == 0].mean()


def test_image_folder_with_train_and_val_subfolders(tmp_path):
    _image_folder(tmp_path / "train", per_class=3)
    _image_folder(tmp_path / "val", per_class=2)
    d = load_dataset("imagefolder", str(tmp_path), image_size=8)
    # val/ is what is reported (the test split); validation is carved out of train/
    assert d.split_sizes() == {"train": 4, "val": 2, "test": 4}


def test_one_class_image_folder_is_refused(tmp_path):
    _image_folder(tmp_path, classes=("cat",))
    with pytest.raises(UserError, match="one class"):
        load_dataset("imagefolder", str(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_named(tmp_path, workers):
    """Streamed, a damaged file is met on load (the mean/std sample) or when its batch is read,
    in a worker process or not: either way one line naming it."""
    _image_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png") as e:
        d = load_dataset("imagefolder", str(tmp_path)).on("cpu", workers=workers)
        for split in ("train", "val", "test"):
            for _ in d.batches(split, 4):
                pass
    assert "\n" not in str(e.value)


def test_embedded_digits_are_sklearns_data_and_split(digits):
    """The split written out in abs_deploy/digits_split.py must stay what scikit-learn's
    stratified train_test_split gives, images and order included."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0,
                              stratify=d.target)
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    assert torch.equal(digits.test_x, images[te])
    assert digits.test_y.tolist() == d.target[te].tolist()
    # train + val are scikit-learn's training part, in its order
    both = torch.cat([digits.train_x, digits.val_x])
    assert sorted(map(tuple, both.flatten(1).tolist())) == sorted(
        map(tuple, images[tr].flatten(1).tolist()))
