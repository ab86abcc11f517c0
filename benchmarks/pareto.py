"""Accuracy vs BOPs on Fashion-MNIST: ABS, BSQ, uniform QAT and prune-then-quantize from one FP
model, three seeds per point, plus the two ablations that separate why ABS wins or loses.

Every method gets the same budget in the same two phases, from the same FP weights:
`--search-epochs` with BatchNorm in place (ABS and BSQ: the search; uniform and
prune-then-quantize: QAT of their fixed decision), then `--ft-epochs` of `finetune` (BN folded,
fixed bits, masks: the deployable form). First and last layer at 8/8 for every method. The
validation split (5,000 images carved from the training set) chooses everything that is chosen
(best epoch, ABS's projection); top-1 is reported on the 10,000 test images only.

Runs:
- uniform w/a in 8/8, 4/4, 2/2;
- ABS at each target (`--targets`);
- prune-then-quantize at the BOPs the ABS run of the same seed and target reached (the richest
  uniform w/a that can reach them with at most half of each prunable group removed, then the
  same fraction of smallest-|w| filters removed from every group, by bisection);
- BSQ at each target (activations 4 bits, its own convention: n magnitude bits count n+1);
- ablation `abs-pinned`: the ABS super-bit training path with every gate held at uniform 4/4
  and nothing pruned, then fine-tuned: against uniform 4/4 it isolates what the super-bit
  training path itself costs; `abs-pinned-nolsq` the same with the super-bit clips trained
  without LSQ's gradient scale (the search as it was before that fix), and `abs-nolsq` the
  whole ABS search that way at `--ablation-target`;
- ablation `abs-decision-fp`: the decision ABS found at `--ablation-target`, trained from the
  FP weights like the baselines (QAT + fine-tune): against ABS it separates the quality of the
  decision from the quality of the searched weights;
- ABS at point `4/4`: its target is the BOPs of uniform 4/4 itself (first/last layer 8/8 puts
  that at 57x, not 64x), the comparison at exactly equal cost;
- `abs-swap`: ABS at `--ablation-target` followed by the opt-in equal-BOPs swap step
  (`abs_search.swap`), which re-scores the decision's neighbours on validation data;
- ablation `abs-noprune`: ABS at the BOPs of uniform 4/4 with `max_prune` 0, so only bits move:
  against `abs` at 4/4 it separates what the pruning side of the decision costs or gains.

`--rerun KEY,...` (e.g. `abs_64x_s0`) trains cached runs again, with the code checked out now,
into `results/pareto/reruns/`; the table compares each with its cached run, which shows whether
runs from older commits still stand for today's code.

Each finished run is a JSON file in `results/pareto/runs/` with its provenance; a rerun skips
runs whose settings match, so the benchmark can be stopped and resumed over several sittings.
The tables (`results/pareto.md`, `.json`) and the plot (`results/pareto.png`) are rewritten
after every run. `--jobs N` runs N single-threaded processes side by side.

    python benchmarks/pareto.py [--jobs 2] [--seeds 0,1,2] [--targets 32x,64x,128x]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from provenance import write_whole

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MAX_PRUNE = 0.5
UNIFORM_PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))   # (w, a), BOPs halving each step
# The files whose code computes a run's numbers; their digest is recorded with every run, so a
# table can say whether all its runs came from the same code.
METHOD_CODE = ("abs_deploy/data.py", "abs_deploy/train.py", "abs_deploy/pretrain.py",
               "abs_deploy/quant.py", "abs_deploy/bops.py", "abs_deploy/graph.py",
               "abs_deploy/search", "abs_deploy/models/fashion.py",
               "abs_deploy/models/resnet.py", "benchmarks/pareto.py")


NAMES = {"uniform": "uniform QAT", "abs": "ABS", "ptq": "prune-then-quantize", "bsq": "BSQ",
         "abs-pinned": "ablation: ABS path pinned", "abs-pinned-nolsq":
         "ablation: ABS path pinned, no LSQ clip scale", "abs-nolsq":
         "ablation: ABS, no LSQ clip scale", "abs-decision-fp":
         "ablation: ABS decision, FP weights", "abs-swap": "ABS + equal-BOPs swap step",
         "abs-noprune": "ablation: ABS, bits only (nothing pruned)"}


@dataclass(frozen=True)
class Budget:
    """What every run of one table shares; a cached run counts only if it matches."""

    model: str = "fashion_cnn"
    model_kwargs: str = '{"width": 8}'
    dataset: str = "fashion-mnist"
    fp_epochs: int = 10
    fp_lr: float = 0.1
    search_epochs: int = 3
    ft_epochs: int = 3
    lr: float = 0.01           # search / QAT
    ft_lr: float = 0.001       # fine-tune (BN folded), the CLI default
    batch_size: int = 128
    bsq_alpha: float = 0.5
    bsq_act_bits: int = 4
    train_limit: int | None = None   # first N training images only: a quick trial, not a result


@dataclass(frozen=True)
class Job:
    method: str            # uniform | abs | ptq | bsq | abs-pinned[-nolsq] | abs-nolsq | ...
    point: str             # "4/4" for uniform, a target like "64x" otherwise
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}_{self.point.replace('/', '-')}_s{self.seed}"

    @staticmethod
    def parse(key: str) -> Job:
        """The job of a run key (`abs_64x_s0`, `uniform_4-4_s1`)."""
        method, point, seed = key.rsplit("_", 2)
        if method not in NAMES or not seed.startswith("s"):
            raise SystemExit(f"not a run key: {key!r} (e.g. abs_64x_s0)")
        return Job(method, point.replace("-", "/"), int(seed[1:]))

    def needs(self) -> Job | None:
        """The run whose result this one starts from."""
        if self.method in ("ptq", "abs-decision-fp"):
            return Job("abs", self.point, self.seed)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="processes side by side, 1 thread each")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--targets", default="32x,64x,128x")
    ap.add_argument("--uniform", default="8,4,2")
    ap.add_argument("--ablation-target", default="64x")
    ap.add_argument("--methods", default=",".join(NAMES))
    ap.add_argument("--search-epochs", type=int, default=Budget.search_epochs)
    ap.add_argument("--ft-epochs", type=int, default=Budget.ft_epochs)
    ap.add_argument("--fp-epochs", type=int, default=Budget.fp_epochs)
    ap.add_argument("--train-limit", type=int, default=None,
                    help="train on the first N training images (a quick trial, not a result)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--rerun", default="",
                    help="comma-separated run keys to train again into reruns/ (a check)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the tables and plot from the cached runs; train nothing")
    args = ap.parse_args()
    budget = Budget(search_epochs=args.search_epochs, ft_epochs=args.ft_epochs,
                    fp_epochs=args.fp_epochs, train_limit=args.train_limit)
    store = Store(args.results)
    if args.report_only:
        store.write_report(budget)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    jobs = plan(seeds, args.targets.split(","), args.uniform.split(","), args.ablation_target,
                methods)
    fp_path = ensure_fp(store, budget)
    if args.rerun:
        reruns = [Job.parse(k) for k in args.rerun.split(",")]
        run_all(reruns, store, budget, fp_path, args.jobs, rerun=True)
        store.write_report(budget)
        return
    todo = [j for j in jobs if not store.done(j, budget)]
    _log(f"{len(jobs) - len(todo)} of {len(jobs)} runs cached; {len(todo)} to do "
         f"with {args.jobs} process(es)")
    run_all(todo, store, budget, fp_path, args.jobs)
    store.write_report(budget)
    print((args.results / "pareto.md").read_text())


def plan(seeds: list[int], targets: list[str], uniform: list[str], ablation_target: str,
         methods: list[str]) -> list[Job]:
    """First every seed of what acceptance and the ablations compare (ABS, uniform and
    prune-then-quantize at `ablation_target` and 4/4, the ablations), then every seed of the
    other points: a benchmark cut short still has its key comparison on every seed. ABS comes
    before the runs that start from its result."""
    t0 = ablation_target
    key_points = [("abs", t0), ("uniform", "4/4"), ("ptq", t0), ("abs-pinned", "4/4"),
                  ("abs-pinned-nolsq", "4/4"), ("abs-nolsq", t0), ("abs-decision-fp", t0)]
    rest = ([("abs", "4/4"), ("abs-noprune", "4/4"), ("abs-swap", t0)]
            + [("abs", t) for t in targets if t != t0]
            + [("uniform", f"{b}/{b}") for b in uniform if b != "4"]
            + [("ptq", t) for t in targets if t != t0] + [("bsq", t) for t in targets])
    jobs = [Job(m, p, s) for points in (key_points, rest) for s in seeds for m, p in points]
    return [j for j in jobs if j.method in methods]


# --- the runs ---------------------------------------------------------------------------------


def ensure_fp(store: Store, budget: Budget) -> Path:
    """The FP model every method starts from: trained once (deterministic: seed 0, 1 thread) and
    cached; its record (top-1, weight digest) is kept with the results, so a model retrained in a
    later sitting must be the same one."""
    import torch

    from abs_deploy.checkpoint import save_checkpoint
    from abs_deploy.pretrain import pretrain
    from abs_deploy.train import TrainConfig

    path = store.folder / "fp.pt"
    record_path = store.folder / "fp.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is not None and record.get("budget") != _fp_budget(budget):
        sys.exit(f"pareto.py: {record_path} is an FP model of other settings; move "
                 f"{store.folder} away to start a new table")
    if not path.is_file():
        torch.set_num_threads(1)
        _log("training the FP model")
        t0 = time.perf_counter()
        data = _load_data(budget)
        ckpt = pretrain(budget.model, data, TrainConfig(
            epochs=budget.fp_epochs, lr=budget.fp_lr, batch_size=budget.batch_size, seed=0),
            json.loads(budget.model_kwargs),
            on_epoch_end=lambda log: _log(f"fp epoch {log.epoch} val {log.val_acc:.4f}"))
        save_checkpoint(ckpt, path)
        digest = _weights_digest(ckpt)
        if record is not None and record["weights_sha256"] != digest:
            sys.exit(f"pareto.py: the retrained FP model differs from the one in {record_path} "
                     "(another machine or thread count?); move the results away to start anew")
        if record is None:
            m = ckpt["metrics"]
            write_whole(record_path, json.dumps({
                "budget": _fp_budget(budget), "weights_sha256": digest,
                "top1": m["top1"], "val_top1": m["val_top1"], "fp_bops": m["fp_bops"],
                "macs": m["macs"], "seconds": time.perf_counter() - t0,
                "history": ckpt["history"], **_provenance(1)}, indent=1))
    return path


def _fp_budget(budget: Budget) -> dict:
    return {k: v for k, v in asdict(budget).items()
            if k in ("model", "model_kwargs", "dataset", "fp_epochs", "fp_lr", "batch_size",
                     "train_limit")}


def _load_data(budget: Budget):
    import dataclasses

    from abs_deploy.data import load_dataset

    data = load_dataset(budget.dataset)
    if budget.train_limit is not None:
        data = dataclasses.replace(data, train_x=data.train_x[:budget.train_limit],
                                   train_y=data.train_y[:budget.train_limit])
    return data


def run_all(todo: list[Job], store: Store, budget: Budget, fp_path: Path, n_jobs: int,
            rerun: bool = False) -> None:
    """Up to `n_jobs` runs at a time; a run whose input is another run waits for it. With
    `rerun`, results go to the reruns folder and inputs come from the cached runs."""
    import multiprocessing

    pending, running, failed = list(todo), {}, []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= n_jobs:
                    break
                dep = job.needs()
                if dep is not None and not store.done(dep, budget) and not rerun:
                    if dep not in failed and (dep in running.values() or dep in pending):
                        continue
                    _log(f"skip {job.key}: needs {dep.key}, which is not done")
                    pending.remove(job)
                    continue
                pending.remove(job)
                dep_row = store.load(dep) if dep is not None else None
                running[pool.submit(run_one, job, budget, str(fp_path), dep_row)] = job
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    row = fut.result()
                except Exception as e:  # one failed run must not end the others
                    _log(f"FAILED {job.key}: {type(e).__name__}: {e}")
                    failed.append(job)
                    continue
                store.save(job, row, rerun)
                _log(f"done {job.key}: test top-1 {100 * row['top1']:.2f}%  "
                     f"BOPs {row['bops'] / 1e6:.2f} M ({row['ratio']:.1f}x)  "
                     f"{row['seconds']:.0f} s")
                store.write_report(budget)
    if failed:
        _log(f"{len(failed)} run(s) failed: {', '.join(j.key for j in failed)}; a rerun "
             "retries them")


def run_one(job: Job, budget: Budget, fp_path: str, dep_row: dict | None) -> dict:
    """One run in a fresh single-threaded process: its phases, then a result row."""
    import torch

    from abs_deploy import bops
    from abs_deploy.checkpoint import load_checkpoint
    from abs_deploy.search.abs_search import abs_search
    from abs_deploy.search.bsq import bsq_search
    from abs_deploy.search.finetune import finetune
    from abs_deploy.train import TrainConfig

    torch.set_num_threads(1)
    code = _worker_provenance()
    t0 = time.perf_counter()
    fp = load_checkpoint(fp_path, stages=("fp",))
    data = _load_data(budget)
    fp_bops = fp["metrics"]["fp_bops"]
    search_cfg = TrainConfig(epochs=budget.search_epochs, lr=budget.lr,
                             batch_size=budget.batch_size, seed=job.seed)
    ft_cfg = TrainConfig(epochs=budget.ft_epochs, lr=budget.ft_lr,
                         batch_size=budget.batch_size, seed=job.seed)
    space = _Space(fp, data)
    extra: dict = {}
    if job.method in ("abs", "abs-nolsq", "abs-swap", "abs-noprune"):
        target = (space.bops(tuple(int(v) for v in job.point.split("/")), 0.0)
                  if "/" in job.point else bops.parse_bops(job.point, fp_bops))
        searched = abs_search(fp, data, target, search_cfg,
                              max_prune=0.0 if job.method == "abs-noprune" else MAX_PRUNE,
                              refine_epochs=0, lsq_scale=job.method != "abs-nolsq",
                              swap_samples=2048 if job.method == "abs-swap" else 0)
        m = searched
        extra = {"target_bops": target, "search_bops": m["search_bops"],
                 "projection_moves": m["projection_moves"], "swap": m.get("swap"),
                 "lam": [h.get("lam") for h in m["history"] if h.get("stage") == "abs"]}
        label = (f"ABS at the BOPs of uniform {job.point}" if "/" in job.point else
                 f"ABS {job.point}") + {"abs-nolsq": " (no LSQ clip scale)",
                                        "abs-swap": " + swap step",
                                        "abs-noprune": ", bits only"}.get(job.method, "")
    elif job.method in ("abs-pinned", "abs-pinned-nolsq"):
        w, a = (int(v) for v in job.point.split("/"))
        searched = abs_search(fp, data, None, search_cfg, max_prune=MAX_PRUNE,
                              refine_epochs=0, pin_bits=(w, a),
                              lsq_scale=job.method == "abs-pinned")
        label = f"ABS path pinned at {job.point}" + (
            " (no LSQ clip scale)" if job.method != "abs-pinned" else "")
    elif job.method == "bsq":
        searched = bsq_search(fp, data, budget.bsq_alpha, budget.bsq_act_bits, search_cfg,
                              target_bops=bops.parse_bops(job.point, fp_bops))
        label = f"BSQ {job.point}"
    elif job.method == "uniform":
        w, a = (int(v) for v in job.point.split("/"))
        searched = _qat(space.fixed(space.bits(w, a), {}, "uniform"), data, search_cfg)
        label = f"uniform {job.point}"
    elif job.method == "ptq":
        (w, a), frac = space.match(dep_row["bops"])
        searched = _qat(space.fixed(space.bits(w, a), space.kept(frac),
                                    "prune-then-quantize"), data, search_cfg)
        label = f"prune {frac:.0%} + {w}/{a}"
        extra = {"matched_bops": dep_row["bops"], "pruned_fraction": frac}
    elif job.method == "abs-decision-fp":
        decision = dep_row["decision"]
        bits = {n: (d["w_bits"], d["a_bits"]) for n, d in decision.items()}
        kept = {n: d["kept"] for n, d in decision.items()}
        searched = _qat(space.fixed(bits, kept, "abs-decision-fp"), data, search_cfg)
        label = f"ABS {job.point} decision from FP weights"
    else:
        raise ValueError(job.method)
    tuned = finetune(searched, data, ft_cfg)
    m = tuned["metrics"]
    return {"method": job.method, "point": job.point, "seed": job.seed, "label": label,
            "top1": m["top1"], "val_top1": m["val_top1"],
            "searched_top1": searched["metrics"]["top1"], "bops": m["bops"],
            "ratio": fp_bops / m["bops"], "seconds": time.perf_counter() - t0,
            "decision": {n: {k: d[k] for k in ("w_bits", "a_bits", "a_signed", "kept")}
                         for n, d in tuned["decision"].to_record().items()},
            "budget": asdict(budget), **extra, **code}


class _Space:
    """Uniform-bit, uniformly-pruned decisions of the FP model and their exact BOPs."""

    def __init__(self, fp: dict, data) -> None:
        import torch

        from abs_deploy import bops, graph
        from abs_deploy.search.qmodel import model_from_checkpoint

        self.fp, self.data = fp, data
        model = model_from_checkpoint(fp)
        x = torch.zeros(data.input_shape)
        self.order = graph.layer_order(model, x)
        self.bn_of = graph.following_norm(model, x)
        self.all_groups = graph.channel_groups(model, x)
        self.groups = [g for g in self.all_groups if g.prunable and g.producers]
        self.costs = bops.layer_costs(model, data.input_shape)
        self.norms = {g.id: _magnitude(model, g.producers) for g in self.groups}

    def kept(self, frac: float) -> dict[str, list[int]]:
        import torch

        out = {}
        for g in self.groups:
            n_keep = g.channels - min(int(round(frac * g.channels)), g.channels - 1)
            keep = sorted(torch.argsort(self.norms[g.id], descending=True)[:n_keep].tolist())
            for p in g.producers:
                out[p] = keep
        return out

    def bits(self, w: int, a: int) -> dict[str, tuple[int, int]]:
        from abs_deploy import bops
        return bops.default_bits(self.costs, w, a, 8)

    def bops(self, bits: tuple[int, int], frac: float) -> float:
        from abs_deploy import bops, graph
        kept = self.kept(frac)
        rows = bops.bops_table(self.costs, self.bits(*bits),
                               {n: len(k) for n, k in kept.items()},
                               graph.input_kept(self.all_groups, kept))
        return float(bops.totals(rows)["bops"])

    def match(self, target: float) -> tuple[tuple[int, int], float]:
        """The richest uniform (w, a) that reaches `target` with at most MAX_PRUNE of each group
        pruned, and the pruned fraction that meets it (the pairs step the BOPs by 2x)."""
        for bits in UNIFORM_PAIRS:
            if self.bops(bits, MAX_PRUNE) <= target:
                break
        if self.bops(bits, 0.0) <= target:
            return bits, 0.0
        lo, hi = 0.0, MAX_PRUNE
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.bops(bits, mid) > target else (lo, mid)
        return bits, hi

    def fixed(self, bits: dict[str, tuple[int, int]], kept: dict[str, list[int]],
              method: str) -> dict:
        """A `searched` checkpoint of the FP weights at `bits` per layer with `kept` filters."""
        from abs_deploy.checkpoint import make_checkpoint
        from abs_deploy.search.qmodel import make_decision, model_from_checkpoint, quantize_model
        from abs_deploy.search.uniform import prepare_quantizers

        model = model_from_checkpoint(self.fp)
        quantize_model(model, {n: tuple(bits[n]) for n in self.order})
        prepare_quantizers(model, self.data)
        decision = make_decision(model, self.bn_of, kept)
        return make_checkpoint("searched", self.fp["arch"], self.fp["input"],
                               self.fp["num_classes"], model.state_dict(), decision,
                               {"top1": None}, [], method=method, bn_folded=False)


def _qat(ckpt: dict, data, cfg) -> dict:
    """QAT of a fixed decision with BatchNorm in place (masks applied): the baselines' share of
    the budget, as the search phase is ABS's. It also repairs the percentile activation clips."""
    from abs_deploy.search.qmodel import model_from_checkpoint
    from abs_deploy.train import evaluate, train

    model = model_from_checkpoint(ckpt)
    train(model, data, cfg)
    return {**ckpt, "state_dict": model.state_dict(),
            "metrics": {"top1": evaluate(model, data, "test")}}


def _magnitude(model, producers: list[str]):
    """Per-filter mean |w| over the producers (the ABS filter norm)."""
    from abs_deploy.search.superbit import filter_norms
    return filter_norms([model.get_submodule(p).weight for p in producers])


# --- results ----------------------------------------------------------------------------------


class Store:
    """One JSON file per finished run under `<results>/pareto/runs/`, and the tables."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.folder = results / "pareto"
        self.runs = self.folder / "runs"
        self.reruns = self.folder / "reruns"
        self.runs.mkdir(parents=True, exist_ok=True)

    def path(self, job: Job) -> Path:
        return self.runs / f"{job.key}.json"

    def done(self, job: Job, budget: Budget) -> bool:
        row = self.load(job)
        return row is not None and row.get("budget") == asdict(budget)

    def load(self, job: Job) -> dict | None:
        try:
            return json.loads(self.path(job).read_text())
        except (OSError, ValueError):
            return None

    def save(self, job: Job, row: dict, rerun: bool = False) -> None:
        if rerun:
            self.reruns.mkdir(exist_ok=True)
        path = self.reruns / f"{job.key}.json" if rerun else self.path(job)
        write_whole(path, json.dumps(row, indent=1))

    def rerun_checks(self, budget: Budget) -> list[dict]:
        """Each rerun beside the cached run it repeats."""
        out = []
        for p in sorted(self.reruns.glob("*.json")) if self.reruns.is_dir() else []:
            new = json.loads(p.read_text())
            old = self.load(Job(new["method"], new["point"], new["seed"]))
            if old is None or new.get("budget") != asdict(budget):
                continue
            out.append({"key": p.stem, **{f"{k}_{w}": r[k] for w, r in (("cached", old),
                        ("rerun", new)) for k in ("top1", "bops", "searched_top1", "commit",
                                                  "method_code_sha256")}})
        return out

    def rows(self, budget: Budget) -> list[dict]:
        rows = []
        for p in sorted(self.runs.glob("*.json")):
            row = json.loads(p.read_text())
            if row.get("budget") == asdict(budget):
                rows.append(row)
        return rows

    def write_report(self, budget: Budget) -> None:
        fp = json.loads((self.folder / "fp.json").read_text())
        rows = self.rows(budget)
        points = summarise(rows)
        out = {**_provenance(None), "budget": asdict(budget), "fp": {
                   k: fp[k] for k in ("top1", "val_top1", "fp_bops", "macs", "weights_sha256",
                                      "commit")},
               "points": points, "runs": [{k: v for k, v in r.items() if k != "decision"}
                                          for r in rows],
               "reruns": self.rerun_checks(budget)}
        write_whole(self.results / "pareto.json", json.dumps(out, indent=1))
        write_whole(self.results / "pareto.md", markdown(out))
        plot(out, self.results / "pareto.png")


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (method, point)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["point"]), []).append(r)
    points = []
    for (method, point), rs in groups.items():
        top1 = [r["top1"] for r in rs]
        ratio = [r["ratio"] for r in rs]
        points.append({
            "method": method, "point": point, "seeds": sorted(r["seed"] for r in rs),
            "top1_mean": statistics.fmean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "bops_mean": statistics.fmean(r["bops"] for r in rs),
            "ratio_mean": statistics.fmean(ratio), "ratio_min": min(ratio),
            "ratio_max": max(ratio),
            "searched_top1_mean": statistics.fmean(r["searched_top1"] for r in rs),
            "labels": sorted({r["label"] for r in rs}),
            "seconds_mean": statistics.fmean(r["seconds"] for r in rs)})
    order = list(NAMES)
    return sorted(points, key=lambda p: (order.index(p["method"]), -p["bops_mean"]))


def markdown(out: dict) -> str:
    b, fp = out["budget"], out["fp"]
    lines = [
        f"# Accuracy vs BOPs: {b['model']} {b['model_kwargs']} on {b['dataset']}", "",
        f"FP test top-1 **{100 * fp['top1']:.2f}%** (validation {100 * fp['val_top1']:.2f}%), "
        f"{fp['fp_bops'] / 1e6:,.1f} M BOPs, {fp['macs'] / 1e6:.2f} M MACs.", "",
        f"Budget for every method: {b['search_epochs']} epochs search/QAT (BN in place, lr "
        f"{b['lr']}) + {b['ft_epochs']} epochs fine-tune (BN folded, lr {b['ft_lr']}), batch "
        f"{b['batch_size']}, from the same FP weights; first/last layer 8/8. Top-1 on the "
        "10,000 test images (one image = 0.01 points); best epochs and ABS's projection chose on "
        "the 5,000 validation images carved from the training set. Mean ± standard deviation "
        "over the seeds listed; BOPs ratio = FP BOPs / BOPs (range over seeds).", "",
        "| method | point | seeds | FP/BOPs | test top-1 % | searched top-1 % | s/run |",
        "|---|---|---|---:|---:|---:|---:|"]
    for p in out["points"]:
        ratio = (f"{p['ratio_mean']:.1f}x" if p["ratio_max"] - p["ratio_min"] < 0.05 else
                 f"{p['ratio_mean']:.1f}x ({p['ratio_min']:.1f}-{p['ratio_max']:.1f})")
        lines.append(
            f"| {NAMES[p['method']]} | {p['point']} | {len(p['seeds'])} | {ratio} | "
            f"{100 * p['top1_mean']:.2f} ± {100 * p['top1_std']:.2f} | "
            f"{100 * p['searched_top1_mean']:.2f} | {p['seconds_mean']:.0f} |")
    commits = sorted({r["commit"] for r in out["runs"]})
    codes = sorted({r["method_code_sha256"][:12] for r in out["runs"]})
    lines += ["", _provenance_md(out),
              f"Runs: {len(out['runs'])}, from commit(s) {', '.join(c[:10] for c in commits)}; "
              f"method code digest(s) {', '.join(codes)}"
              + (" (one: every run computed by the same code)." if len(codes) == 1 else
                 " (**more than one: the runs came from different code**; each run's commit "
                 "is in its file, and the reruns below, if any, repeat older runs with later "
                 "code)."),
              *_reruns_md(out.get("reruns", [])),
              "Each run's own record (command, packages, CPU, threads, date) is in "
              "`results/pareto/runs/`; the FP model's in `results/pareto/fp.json`. The record "
              "above is that of the run that wrote this table."]
    return "\n".join(lines) + "\n"


def _reruns_md(reruns: list[dict]) -> list[str]:
    """A run retrained with later code, beside its cached result: identical numbers show that
    the code between the two commits does not change what the runs compute."""
    if not reruns:
        return []
    lines = ["", "Reruns of cached runs (`--rerun`), same seed, one thread each:", "",
             "| run | cached: commit, code | rerun: commit, code | test top-1 % | BOPs | same |",
             "|---|---|---|---|---|---|"]
    for r in reruns:
        same = all(r[f"{k}_cached"] == r[f"{k}_rerun"] for k in ("top1", "bops", "searched_top1"))
        lines.append(
            f"| {r['key']} | {r['commit_cached'][:10]}, {r['method_code_sha256_cached'][:12]} | "
            f"{r['commit_rerun'][:10]}, {r['method_code_sha256_rerun'][:12]} | "
            f"{100 * r['top1_cached']:.2f} / {100 * r['top1_rerun']:.2f} | "
            f"{r['bops_cached'] / 1e6:.2f} M / {r['bops_rerun'] / 1e6:.2f} M | "
            f"{'yes' if same else '**no**'} |")
    return lines + [""]


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    styles = {"uniform": "s--", "abs": "o-", "ptq": "^:", "bsq": "d-."}
    for method, style in styles.items():
        pts = sorted((p["bops_mean"] / 1e6, 100 * p["top1_mean"], 100 * p["top1_std"])
                     for p in out["points"] if p["method"] == method)
        if pts:
            x, y, e = zip(*pts, strict=True)
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=NAMES[method])
    ax.axhline(100 * out["fp"]["top1"], color="gray", lw=0.8, label="FP")
    ax.set_xscale("log")
    ax.set_xlabel("BOPs (M, log scale)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    b = out["budget"]
    ax.set_title(f"{b['model']} on {b['dataset']}, {b['search_epochs']}+{b['ft_epochs']} epochs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        # The figure carries its provenance too (PNG text chunks), and names the table it draws.
        fig.savefig(tmp, dpi=120, metadata={
            "Source": f"commit {out.get('commit')}; command: {out.get('command')}",
            "Description": "benchmarks/results/pareto.json holds the numbers and each run's "
                           "provenance", "Creation Time": str(out.get("date"))})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


# --- helpers ----------------------------------------------------------------------------------


_WORKER_PROVENANCE: dict = {}


def _worker_provenance() -> dict:
    """The provenance of the code this worker process imported: taken once, at its first run,
    so an edit made to the tree while the benchmark runs is not credited to runs that did not
    execute it (a worker keeps the modules it imported)."""
    if not _WORKER_PROVENANCE:
        _WORKER_PROVENANCE.update(_provenance(1))
    return dict(_WORKER_PROVENANCE)


def _provenance(threads: int | None) -> dict:
    from provenance import provenance
    return {**provenance(threads), "method_code_sha256": _method_code_digest()}


def _provenance_md(out: dict) -> str:
    from provenance import provenance_markdown
    return provenance_markdown(out)


def _method_code_digest() -> str:
    h = hashlib.sha256()
    for rel in METHOD_CODE:
        p = ROOT / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _weights_digest(ckpt: dict) -> str:
    h = hashlib.sha256()
    for k, v in sorted(ckpt["state_dict"].items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
