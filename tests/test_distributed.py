"""Multi-process training on CPU with torchrun and gloo (issue #13): DDP on 2 processes takes the
same step as one process on the whole batch, every rank holds the same decision, and the CLI's
stages under torchrun write exactly one checkpoint each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abs_deploy.checkpoint import load_checkpoint
from abs_deploy.data import dataset_for
from abs_deploy.distributed import SINGLE, current
from abs_deploy.search.qmodel import model_from_checkpoint
from abs_deploy.train import evaluate

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _worker(out: Path, nproc: int, *flags: str) -> list[dict]:
    out.mkdir()
    launcher = [sys.executable] if nproc == 1 else [*TORCHRUN, "--nproc-per-node", str(nproc)]
    _run([*launcher, WORKER, str(out), "2", *flags])
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def _worst_relative(a: dict, b: dict) -> dict[str, float]:
    """Per tensor: the largest difference relative to the tensor's largest magnitude."""
    return {k: float((v - b[k]).abs().max() / v.abs().max().clamp_min(1e-12))
            for k, v in a.items() if v.is_floating_point() and v.numel()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return _worker(tmp_path_factory.mktemp("single") / "out", 1, "--sync-bn", "--f64")[0]


def test_two_processes_of_32_take_the_steps_one_process_of_64_takes(one_process, tmp_path):
    """Two ABS steps (a weight-gate and an activation-gate step) on 2 ranks x 32 images with
    SyncBN: weights, clips, gate thresholds and BN statistics equal those of one process on
    the same 64 images to 1e-5 relative, and both ranks hold identical tensors."""
    ranks = _worker(tmp_path / "ddp", 2, "--sync-bn", "--f64")
    assert [r["world"] for r in ranks] == [2, 2] and one_process["world"] == 1
    assert all(torch.equal(v, ranks[1]["state"][k]) for k, v in ranks[0]["state"].items())
    worst = _worst_relative(one_process["state"], ranks[0]["state"])
    assert max(worst.values()) <= 1e-5, {k: v for k, v in worst.items() if v > 1e-5}
    assert {k.rsplit(".", 1)[1] for k in worst} >= {"weight", "w_clip", "a_clip", "w_thr",
                                                    "a_thr", "f_thr", "running_mean"}
    assert ranks[0]["lam"] == ranks[1]["lam"] == pytest.approx(one_process["lam"], rel=1e-9)
    assert ranks[0]["decision"] == ranks[1]["decision"] == one_process["decision"]
    assert all(r["agreed"] for r in ranks)


def test_without_sync_bn_the_processes_normalise_their_own_halves(one_process, tmp_path):
    """The comparison above can fail: each rank's BatchNorm on its own 32 images moves the
    running statistics (and, through them, everything after) away from the 64-image step."""
    ranks = _worker(tmp_path / "ddp", 2, "--f64")
    worst = _worst_relative(one_process["state"], ranks[0]["state"])
    assert worst["bn.running_mean"] > 1e-3


def test_a_rank_that_disagrees_is_caught(tmp_path):
    ranks = _worker(tmp_path / "ddp", 2, "--disagree")
    assert [r["agreed"] for r in ranks] == [False, False]


def test_outside_torchrun_a_process_is_rank_0_of_1():
    assert current() == SINGLE and SINGLE.is_main and not SINGLE.active
    assert SINGLE.sum([1.0, 2.0]) == [1.0, 2.0] and SINGLE.broadcast({"a": 1}) == {"a": 1}


def test_the_stages_under_torchrun_write_one_checkpoint_each(tmp_path):
    """The user's path on 2 gloo processes: pretrain, an ABS search at 64x and fine-tune on
    digits. Each stage writes exactly one file (no .partial left), prints its result once, and
    the search lands within 5% of its target."""
    cli = [*TORCHRUN, "--nproc-per-node", "2", "-m", "abs_deploy.cli"]
    common = ["--device", "cpu", "--batch-size", "64"]
    pre = _run([*cli, "pretrain", "--model", "digits_cnn", "--epochs", "3", *common,
                "-o", "fp.pt"], cwd=tmp_path)
    assert pre.stdout.count("-> fp.pt") == 1
    fp = load_checkpoint(tmp_path / "fp.pt")
    data = dataset_for(fp["input"])
    # What the ranks reported together is what the one file holds, evaluated by one process.
    assert fp["metrics"]["top1"] == evaluate(model_from_checkpoint(fp), data, "test")
    search = _run([*cli, "search", "fp.pt", "--target-bops", "64x", "--epochs", "2", "--sync-bn",
                   *common, "-o", "s.pt"], cwd=tmp_path)
    assert search.stdout.count("-> s.pt") == 1
    tune = _run([*cli, "finetune", "s.pt", "--epochs", "1", *common, "-o", "ft.pt"],
                cwd=tmp_path)
    assert tune.stdout.count("-> ft.pt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.pt", "ft.pt", "s.pt"]
    searched = torch.load(tmp_path / "s.pt", weights_only=True)
    target = searched["target_bops"]
    assert abs(searched["metrics"]["bops"] / target - 1) <= 0.05
    assert torch.load(tmp_path / "ft.pt", weights_only=True)["stage"] == "finetuned"


def test_a_search_killed_under_torchrun_resumes_under_torchrun(tmp_path, fp_digits_path):
    """SIGTERM to torchrun after the first epoch's state is on disk; `--resume` on 2 processes
    runs only the missing epochs, writes the one output and removes the state file."""
    import signal

    from search_processes import kill_after_epochs

    cli = [*TORCHRUN, "--nproc-per-node", "2", "-m", "abs_deploy.cli", "search",
           str(fp_digits_path), "--target-bops", "64x", "--epochs", "4", "--device", "cpu"]
    state = tmp_path / "s.pt.partial"
    proc = subprocess.Popen([*cli, "-o", "s.pt"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = kill_after_epochs(proc, state, 1, signal.SIGTERM)
    assert 1 <= done < 4 and not (tmp_path / "s.pt").exists(), "ended before it was killed"
    resumed = _run([*cli, "--resume", "-o", "s.pt"], cwd=tmp_path)
    epochs = [int(line.split()[2]) for line in resumed.stdout.splitlines()
              if line.startswith("abs epoch")]
    assert epochs == list(range(done + 1, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]
