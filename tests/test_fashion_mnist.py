"""The idx reader on small files the tests write, and the Fashion-MNIST loader on Debian's files
when they are installed (`apt-get install dataset-fashion-mnist`)."""

import gzip
import hashlib

import numpy as np
import pytest
import torch

from abs_deploy.data import _FASHION, FASHION_MNIST_DIR, load_dataset, read_idx
from abs_deploy.errors import UserError


def _idx(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in values.shape)
    return header + values.astype(np.uint8).tobytes()


def _fake_fashion(folder, n_train=60, n_test=20, corrupt=None):
    """Four gzip idx files of Fashion-MNIST's names and shapes (fewer images)."""
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
              "test": (rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10)}
    for split, ((img_file, _, _), (lbl_file, _, _)) in _FASHION.items():
        images, labels = arrays[split]
        for name, payload in ((img_file, _idx(images)), (lbl_file, _idx(labels))):
            if corrupt is not None and name == corrupt[0]:
                payload = corrupt[1](payload)
            (folder / name).write_bytes(gzip.compress(payload))
    return arrays


def test_idx_round_trip_gzip_and_plain(tmp_path):
    values = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    (tmp_path / "a.idx").write_bytes(_idx(values))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx(values)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name, ndim=3, count=2)
        assert out.dtype == np.uint8 and np.array_equal(out, values)


def test_idx_checksum_is_of_the_decompressed_content(tmp_path):
    raw = _idx(np.zeros((3, 2, 2)))
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    read_idx(tmp_path / "a.gz", ndim=3, sha256=hashlib.sha256(raw).hexdigest())
    with pytest.raises(UserError, match="checksum"):
        read_idx(tmp_path / "a.gz", ndim=3, sha256="0" * 64)


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-5], "truncated or padded"),
    (lambda b: b[:6], "truncated idx header"),
    (lambda b: b"\x00\x00\x0d" + b[3:], "magic number"),      # float type: not Fashion-MNIST
    (lambda b: b"\x00\x00\x08\x02" + b[4:], "magic number"),  # 2-d where 3-d is expected
    (lambda b: b"PK\x03\x04" + b[4:], "magic number"),
])
def test_bad_idx_files_are_one_error_naming_the_file(tmp_path, mangle, message):
    (tmp_path / "x.idx").write_bytes(mangle(_idx(np.zeros((4, 2, 2)))))
    with pytest.raises(UserError, match=message) as err:
        read_idx(tmp_path / "x.idx", ndim=3)
    assert "x.idx" in str(err.value) and "\n" not in str(err.value)


def test_count_mismatch_is_refused(tmp_path):
    (tmp_path / "x.idx").write_bytes(_idx(np.zeros((4, 2, 2))))
    with pytest.raises(UserError, match="holds 4 items, expected 5"):
        read_idx(tmp_path / "x.idx", ndim=3, count=5)


def test_broken_gzip_is_refused(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(_idx(np.zeros((4, 2, 2))))[:-10])
    with pytest.raises(UserError, match="cannot read"):
        read_idx(tmp_path / "x.gz", ndim=3)


def test_missing_files_name_the_debian_package_at_the_default_folder(tmp_path, monkeypatch):
    import abs_deploy.data as data
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(UserError, match="lacks train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_loader_checks_counts_against_the_real_dataset(tmp_path):
    """Files with the right names and format but 60 images are not Fashion-MNIST."""
    _fake_fashion(tmp_path)
    with pytest.raises(UserError, match="expected 60000"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_loader_splits_and_labels_of_small_files(tmp_path, monkeypatch):
    import abs_deploy.data as data
    small = {split: tuple((f, n, None) for f, _, _ in pair) for split, pair, n in
             (("train", _FASHION["train"], 60), ("test", _FASHION["test"], 20))}
    monkeypatch.setattr(data, "_FASHION", small)
    monkeypatch.setattr(data, "FASHION_MNIST_VAL", 10)
    arrays = _fake_fashion(tmp_path)
    d = load_dataset("fashion-mnist", str(tmp_path), verify=False)
    assert d.split_sizes() == {"train": 50, "val": 10, "test": 20}
    assert d.input_shape == [1, 1, 28, 28] and d.num_classes == 10
    assert torch.equal(d.test_x[:, 0], torch.from_numpy(arrays["test"][0].astype(np.uint8)))
    assert torch.bincount(d.val_y, minlength=10).tolist() == [1] * 10


def test_wrong_image_checksum_is_refused(tmp_path, monkeypatch):
    import abs_deploy.data as data
    small = {split: tuple((f, n, "0" * 64) for f, _, _ in pair) for split, pair, n in
             (("train", _FASHION["train"], 60), ("test", _FASHION["test"], 20))}
    monkeypatch.setattr(data, "_FASHION", small)
    _fake_fashion(tmp_path)
    with pytest.raises(UserError, match="checksum"):
        load_dataset("fashion-mnist", str(tmp_path))


_HAVE_REAL = all((FASHION_MNIST_DIR / f).is_file()
                 for pair in _FASHION.values() for f, _, _ in pair)


@pytest.mark.skipif(not _HAVE_REAL, reason=f"Fashion-MNIST is not installed in "
                    f"{FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_debian_package():
    d = load_dataset("fashion-mnist")
    assert d.split_sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert d.train_x.dtype == torch.uint8 and d.input_shape == [1, 1, 28, 28]
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    assert torch.bincount(d.val_y).tolist() == [500] * 10
    # the published mean/std of Fashion-MNIST's training images (0.2860, 0.3530)
    assert abs(d.mean[0] - 0.2860) < 2e-3 and abs(d.std[0] - 0.3530) < 2e-3
