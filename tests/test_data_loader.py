"""Every split read through a DataLoader: the single-process order kept, sharding over ranks
(training: DistributedSampler; evaluation: every image once), augmentation independent of the
workers, and image folders streamed from disk in the ImageNet layout."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from abs_deploy.data import load_dataset
from abs_deploy.errors import UserError
from abs_deploy.images import TRAIN_UNIFORMS, crop_box, uniforms


def _order(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def test_single_process_batches_keep_the_randperm_order_and_values(digits):
    for seed in (0, 7):
        order = _order(len(digits.train_y), seed)
        got = list(digits.batches("train", 100, shuffle=True, seed=seed))
        assert len(got) == digits.num_batches("train", 100) == 12
        for i, (x, y) in enumerate(got):
            idx = order[100 * i:100 * (i + 1)]
            assert torch.equal(y, digits.train_y[idx])
            assert torch.equal(x, digits.normalize(digits.train_x[idx]))
    x, y = torch.cat([b for b, _ in digits.batches("test", 64)]), digits.test_y
    assert torch.equal(x, digits.normalize(digits.test_x))
    assert torch.equal(torch.cat([y for _, y in digits.batches("test", 64)]), y)


def test_two_ranks_first_batches_are_the_single_process_batch(digits):
    order = _order(len(digits.train_y), 3)
    (x, y), = [next(digits.batches("train", 64, shuffle=True, seed=3))]
    shards = [next(digits.batches("train", 64, shuffle=True, seed=3, rank=r, world=2))
              for r in (0, 1)]
    for r, (xr, yr) in enumerate(shards):
        assert torch.equal(yr, digits.train_y[order[r::2][:32]])
        assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])
    assert digits.num_batches("train", 64, world=2) == digits.num_batches("train", 64)


def test_evaluation_shards_count_every_image_once(digits):
    """Summing correct/total over the ranks must count each test image exactly once: no
    padding, whatever the number of ranks."""
    expected = _rows(digits.normalize(digits.test_x), digits.test_y)
    for world in (2, 3, 7):
        seen = [row for rank in range(world)
                for x, y in digits.batches("test", 64, rank=rank, world=world)
                for row in _rows(x, y)]
        assert len(seen) == 360 and sorted(seen) == sorted(expected)


def _rows(x, y):
    return [(tuple(row.tolist()), int(label)) for row, label in zip(x.flatten(1), y, strict=True)]


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(digits):
    with pytest.raises(UserError, match="does not split evenly over 3"):
        next(digits.batches("train", 64, shuffle=True, rank=0, world=3))
    with pytest.raises(UserError, match="does not split evenly"):
        digits.num_batches("train", 65, world=2)


def test_augmentation_is_the_same_with_and_without_workers():
    data = dataclasses.replace(load_dataset("synthetic"), augment=True)
    a = [x for x, _ in data.batches("train", 32, shuffle=True, seed=5)]
    b = [x for x, _ in data.on("cpu", workers=2).batches("train", 32, shuffle=True, seed=5)]
    plain = [x for x, _ in data.batches("train", 32, shuffle=True, seed=5, augment=False)]
    other = [x for x, _ in data.batches("train", 32, shuffle=True, seed=6)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], plain[0]) and not torch.equal(a[0][:1], other[0][:1])


def test_augmentation_numbers_depend_on_seed_and_image_only():
    u = uniforms(4, [10, 11, 12], 5)
    assert u.shape == (3, 5) and ((u >= 0) & (u < 1)).all()
    assert np.array_equal(uniforms(4, [12], 5)[0], u[2])
    assert not np.array_equal(uniforms(5, [12], 5)[0], u[2])
    many = uniforms(0, np.arange(20000), 2)
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many.T)[0, 1]) < 0.03


def test_crop_box_fits_the_image_and_falls_back_to_the_centre():
    for i in range(200):
        left, top, w, h = crop_box(48, 40, uniforms(1, [i], TRAIN_UNIFORMS)[0])
        assert 0 <= left and left + w <= 48 and 0 <= top and top + h <= 40
        assert 0.08 * 48 * 40 * 0.8 <= w * h <= 48 * 40
    # A 100 x 10 strip fits no box of 8-100% of its area at ratio 3/4-4/3 with these numbers:
    # the fallback is the centre crop at ratio 4/3.
    assert crop_box(100, 10, np.full(TRAIN_UNIFORMS, 0.99)) == (43, 0, 13, 10)


def _imagenet_folder(root, classes=3, train=12, val=4, broken=None):
    """ImageNet layout, 40 x 48 PNGs; class c is tinted by channel c so labels are learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / part / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                arr = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
                arr[..., c] += 150
                Image.fromarray(arr).save(folder / f"{i}.png")
    if broken:
        (root / broken).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _imagenet_folder(tmp_path_factory.mktemp("imagenet"))


def test_image_folder_is_streamed_at_the_image_size(folder):
    d = load_dataset("imagefolder", str(folder), image_size=16)
    assert d.train_x is None and d.val_x is None and d.test_x is None
    assert d.split_sizes() == {"train": 33, "val": 3, "test": 12}
    assert d.input_shape == [1, 3, 16, 16] and d.extra["classes"] == ["class0", "class1",
                                                                       "class2"]
    x, y = next(d.batches("train", 8, shuffle=True, seed=1))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The mean/std sample (all 33 training images here, evaluation view) normalises them.
    x = torch.cat([x for x, _ in d.batches("train", 64, augment=False)])
    assert x.mean((0, 2, 3)).abs().max() < 1e-3 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-2


def test_image_folder_views_are_deterministic_and_worker_independent(folder):
    d = load_dataset("imagefolder", str(folder), image_size=16)
    two = d.on("cpu", workers=2)
    ev = [torch.cat([x for x, _ in data.batches("test", 5)]) for data in (d, d, two)]
    assert torch.equal(ev[0], ev[1]) and torch.equal(ev[0], ev[2])
    tr = [torch.cat([x for x, _ in data.batches("train", 8, shuffle=True, seed=s)])
          for data, s in ((d, 2), (two, 2), (d, 3))]
    assert torch.equal(tr[0], tr[1]) and not torch.equal(tr[0], tr[2])
    # training views are crops of the image, not its evaluation view
    assert not torch.equal(next(d.batches("train", 8))[0], next(d.batches("train", 8,
                                                                          augment=False))[0])


def test_persistent_workers_serve_every_epoch(folder):
    d = load_dataset("imagefolder", str(folder), image_size=16).on("cpu", workers=2)
    for epoch in range(3):
        list(d.batches("train", 8, shuffle=True, seed=epoch))
        if epoch == 0:
            (loader,) = d._loaders().values()
            workers = loader._iterator._workers
    (again,) = d._loaders().values()
    assert again is loader and again._iterator._workers == workers


def test_unreadable_image_met_in_a_worker_is_one_line_naming_it(tmp_path):
    root = _imagenet_folder(tmp_path, train=4, val=2, broken="val/class1/zz.png")
    d = load_dataset("imagefolder", str(root), image_size=8).on("cpu", workers=2)
    with pytest.raises(UserError) as e:
        list(d.batches("test", 2))
    assert "zz.png" in str(e.value) and "\n" not in str(e.value)


def test_workers_must_not_be_negative(digits):
    with pytest.raises(UserError, match="0 or more"):
        digits.on("cpu", workers=-1)


def test_image_folder_trains_and_evaluates_through_two_workers(folder):
    """Acceptance (issue #13, item 3 c): an ImageNet-layout folder, two DataLoader workers, the
    shared training loop and evaluation."""
    from abs_deploy.train import TrainConfig, evaluate, set_seed, train

    data = load_dataset("imagefolder", str(folder), image_size=16).on("cpu", workers=2)
    set_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, data.num_classes))
    logs = train(model, data, TrainConfig(epochs=1, batch_size=16, lr=0.05))
    assert len(logs) == 1 and np.isfinite(logs[0].loss)
    top1 = evaluate(model, data, "test")
    assert 0.0 <= top1 <= 1.0
    assert data._loaders()   # the loaders (and their workers) were built by the DataLoader path


def test_reading_batches_leaves_the_global_rng_alone():
    """Model initialisation after a pass over the data must not depend on that pass."""
    data = load_dataset("digits")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in data.batches("train", 64, shuffle=True, seed=5):
        pass
    assert torch.equal(torch.get_rng_state(), before)
