"""Peak memory and speed of one training epoch on a streamed image folder (issue #13, item 3).

Generates ImageNet-layout folders (`train/<class>/`, `val/<class>/`, 10 classes, 64x64 PNGs) of
each size in `--counts` in a temporary folder, then for each size and each worker count runs
ONE epoch of `abs_deploy.train.train` (a small CNN, `digits_cnn` with 3 input channels, at
`--image-size`) in a fresh subprocess with one torch thread, so that its peak RSS is its own:
`ru_maxrss` of the process itself (RUSAGE_SELF) and of its largest finished child (RUSAGE_CHILDREN:
the DataLoader workers, read after they are joined). Streaming means the main process's peak must
not grow with the number of images.

    python benchmarks/data_memory.py [--counts 1000,4000,16000] [--workers 0,2] [--image-size 32]

writes benchmarks/results/data_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import load_note, provenance, provenance_markdown, write_results

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 10
SIDE = 64
# The two ways each run is made. "default": glibc's malloc as a user gets it; its mmap threshold
# rises after big blocks are freed, so later big tensors come from the heap and RSS keeps
# fragments of them: a peak that wanders by tens of MB from run to run. "fixed": the threshold
# pinned at its 128 KiB default, so every big tensor is mapped and unmapped and RSS follows the
# memory actually in use: the run that shows whether that grows with the folder.
MALLOC = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
INFLATED = ("The images/s are lowered by the other work (the 2-worker runs most: their workers "
            "compete with it for the 2 cores); peak RSS does not depend on the load.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1000,4000,16000", help="images per generated folder")
    ap.add_argument("--workers", default="0,2", help="DataLoader workers to compare")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--one", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.image_size,
                                 args.batch_size)))
        return
    prov = provenance(threads=1)
    counts = [int(c) for c in args.counts.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="abs_data_memory_") as tmp:
        for count in counts:
            root = make_folder(Path(tmp) / str(count), count)
            for malloc, env in MALLOC.items():
                for w in workers:
                    out = subprocess.run([sys.executable, __file__, "--one", str(root), str(w),
                                          "--image-size", str(args.image_size),
                                          "--batch-size", str(args.batch_size)],
                                         check=True, capture_output=True, text=True,
                                         env={**os.environ, **env})
                    rows.append({"images": count, "malloc": malloc,
                                 **json.loads(out.stdout.strip().splitlines()[-1])})
                    print(rows[-1], file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    result = {"commit": prov["commit"], "command": prov["command"], "provenance": prov,
              "load_avg_end": [round(v, 2) for v in os.getloadavg()],
              "settings": {"classes": CLASSES, "png_side": SIDE, "image_size": args.image_size,
                           "batch_size": args.batch_size, "model": "digits_cnn (in_chans=3)",
                           "threads": 1},
              "rows": rows}
    write_results(RESULTS, "data_memory", result, _markdown(result))


def make_folder(root: Path, count: int) -> Path:
    """`count` 64x64 PNGs in the ImageNet layout, a fifth of them under val/ (the test split).
    Each is smooth noise (8x8 upscaled, plus fine grain) tinted by its class: real decoding work,
    and a signal the CNN can pick up."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(count)
    for i in range(count):
        label = i % CLASSES
        part = "val" if (i // CLASSES) % 5 == 4 else "train"
        folder = root / part / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 200, (8, 8, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.int16)
        arr = arr + rng.integers(0, 40, (SIDE, SIDE, 3)) + 15 * np.array(
            [label % 3, (label // 3) % 3, label // 6])
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return root


def run_one(folder: str, workers: int, image_size: int, batch_size: int) -> dict:
    """One training epoch (and its validation pass) on `folder` with `workers`, then one pass of
    reading alone; peak RSS and images/s."""
    import gc

    import torch

    from abs_deploy.data import load_dataset
    from abs_deploy.models import create_model
    from abs_deploy.train import TrainConfig, set_seed, train

    torch.set_num_threads(1)
    set_seed(0)   # first: it imports more of torch, which is no part of the data's cost
    rss_start = _maxrss(resource.RUSAGE_SELF)
    data = load_dataset("imagefolder", folder, image_size=image_size).on("cpu", workers=workers)
    sizes = data.split_sizes()
    model = create_model("digits_cnn", num_classes=data.num_classes, in_chans=3)
    timing: dict = {}
    t0 = time.perf_counter()
    logs = train(model, data, TrainConfig(epochs=1, batch_size=batch_size, lr=0.05),
                 progress=lambda batches, total, desc: _timed(batches, timing))
    epoch_s = time.perf_counter() - t0
    # The loader alone (its workers already running): one more pass over the training split.
    t1 = time.perf_counter()
    read = sum(len(y) for _, y in data.batches("train", batch_size, shuffle=True, seed=1))
    read_s = time.perf_counter() - t1
    # Dropping the dataset stops its workers (joined), so RUSAGE_CHILDREN then covers them.
    del data
    gc.collect()
    return {"workers": workers, **{f"{k}_images": v for k, v in sizes.items()},
            "val_acc": logs[-1].val_acc, "train_seconds": timing["seconds"],
            "train_images_per_s": timing["images"] / timing["seconds"],
            "epoch_seconds": epoch_s, "read_images_per_s": read / read_s,
            "rss_at_start_mb": rss_start, "peak_rss_training_pass_mb": timing["peak_rss_mb"],
            "peak_rss_main_mb": _maxrss(resource.RUSAGE_SELF),
            "peak_rss_largest_worker_mb": _maxrss(resource.RUSAGE_CHILDREN)}


def _timed(batches, timing: dict):
    """The training pass's batches, timed from the first request to the last (decoding and
    the training steps both: what a user waits for)."""
    t0, n = time.perf_counter(), 0
    for x, y in batches:
        n += len(y)
        yield x, y
    timing.update(seconds=time.perf_counter() - t0, images=n,
                  peak_rss_mb=_maxrss(resource.RUSAGE_SELF))


def _maxrss(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024   # Linux reports KiB


def _markdown(result: dict) -> str:
    rows, s, prov = result["rows"], result["settings"], result["provenance"]
    fixed = [r for r in rows if r["malloc"] == "fixed"]
    default = [r for r in rows if r["malloc"] == "default"]
    lines = [f"# Streamed image folder: peak memory and speed of one training epoch "
             f"(image size {s['image_size']}, batch {s['batch_size']}, 1 torch thread)", "",
             load_note(prov, result["load_avg_end"], INFLATED), "",
             "## Peak memory (malloc's mmap threshold fixed: RSS follows the memory in use)", "",
             _growth(fixed), "", *_memory_table(fixed), "",
             "## Speed, and memory as a user gets it (glibc's malloc as it comes)", "",
             "| images | workers | training images/s | reading images/s | epoch s | "
             "peak RSS MB, training pass | peak RSS MB, whole run |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in default:
        lines.append(f"| {r['images']:,} | {r['workers']} | {r['train_images_per_s']:.0f} | "
                     f"{r['read_images_per_s']:.0f} | {r['epoch_seconds']:.1f} | "
                     f"{r['peak_rss_training_pass_mb']:.0f} | {r['peak_rss_main_mb']:.0f} |")
    lines += ["", "## Method", "",
              f"- Folders generated in a temporary directory: {s['classes']} classes, "
              f"{s['png_side']}x{s['png_side']} RGB PNGs (smooth noise tinted by class), "
              "ImageNet layout with a fifth of the images under `val/` (the test split); a "
              "tenth of `train/` is carved out as the validation split.",
              f"- Each row is a fresh subprocess: `load_dataset(\"imagefolder\", ..., "
              f"image_size={s['image_size']}).on(\"cpu\", workers=N)`, then one epoch of "
              f"`abs_deploy.train.train` ({s['model']}, SGD, batch {s['batch_size']}; "
              "random-resized crop + flip, decoded per item) with its validation pass, then "
              "one pass of reading alone; `torch.set_num_threads(1)`.",
              "- Peak RSS is `ru_maxrss` of the process (RUSAGE_SELF): at the end of the "
              "training pass, and at the end of the run (validation and reading passes "
              "included). At start: the same after the imports and `set_seed`, before the folder "
              "is listed. The validation pass evaluates in batches of 256 (`evaluate`'s "
              "default), so its activations grow with the validation split until that holds 256 "
              "images: that, not the data, is why the whole-run peak of the 1,000-image folder "
              "(80 validation images) sits lower.",
              "- Two runs of each: with `MALLOC_MMAP_THRESHOLD_=131072` (glibc's default "
              "threshold, pinned so that it does not rise: every large tensor is mapped and "
              "unmapped, so RSS is the memory in use) for the memory table, and with glibc's "
              "malloc untouched for the speed table (the pinned threshold costs page faults), "
              "whose peaks are higher and drift up by tens of MB with the number of steps: the "
              "heap keeps fragments of freed tensors.",
              "- Largest worker: `ru_maxrss` of RUSAGE_CHILDREN after the workers are joined "
              "(the largest single child). A forked worker counts the main process's pages it "
              "maps, so this follows the main process's size when the loader was started.",
              "- Training images/s: training images over the wall time of the training pass "
              "(first batch requested to last batch consumed: decoding and the training steps). "
              "Reading images/s: one more pass over the training split's batches after the "
              "epoch, with no model (the loader alone, its workers already running).",
              ""]
    return "\n".join(lines) + "\n" + provenance_markdown(prov)


def _memory_table(rows: list[dict]) -> list[str]:
    lines = ["| images | train / val / test | workers | peak RSS MB, training pass | "
             "peak RSS MB, whole run | at start MB | largest worker MB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        worker = f"{r['peak_rss_largest_worker_mb']:.0f}" if r["workers"] else "-"
        lines.append(f"| {r['images']:,} | {r['train_images']:,} / {r['val_images']:,} / "
                     f"{r['test_images']:,} | {r['workers']} | "
                     f"{r['peak_rss_training_pass_mb']:.0f} | {r['peak_rss_main_mb']:.0f} | "
                     f"{r['rss_at_start_mb']:.0f} | {worker} |")
    return lines


def _growth(rows: list[dict]) -> str:
    """One sentence: how far the peaks move over the folder sizes."""
    counts = sorted({r["images"] for r in rows})
    parts = []
    for w in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == w]
        train = [r["peak_rss_training_pass_mb"] for r in mine]
        run = [r["peak_rss_main_mb"] for r in mine if r["val_images"] >= 256]
        part = f"with {w} workers the training pass peaks at {min(train):.0f}-{max(train):.0f} MB"
        if run:
            part += (f" and the whole run (validation split of 256 images or more) at "
                     f"{min(run):.0f}-{max(run):.0f} MB")
        parts.append(part)
    return (f"Over {', '.join(f'{c:,}' for c in counts)} images, " + "; ".join(parts) + ".")


if __name__ == "__main__":
    main()
