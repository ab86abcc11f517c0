"""Accuracy vs BOPs (default ResNet-20 on digits32): ABS at several targets, uniform QAT
(8/8, 4/4, 2/2), and prune-then-quantize (magnitude filter pruning, then uniform QAT) at ABS's BOPs.

Every method gets the same training in the same two phases: `--search-epochs` with BatchNorm
in place at the search lr (ABS: the search; uniform and prune-then-quantize: QAT of their fixed
decision from the FP weights), then `--ft-epochs` of `finetune` (BN folded, fixed bits, masks:
the deployable form) at `--ft-lr`. First and last layer at 8/8 for all.

Prune-then-quantize: for each ABS result, the richest uniform bits (w/a in 8/8, 8/4, 4/4, 4/2,
2/2) that can reach its BOPs with at most `max_prune` of every prunable group removed, then the
same fraction of filters removed from every prunable group (smallest mean |w| first), found by
bisection on the BOPs.
Without an ABS row for that target (e.g. `--methods ptq` alone) it matches the target itself.

    python benchmarks/pareto.py [--fp fp.pt] [--methods abs,ptq,uniform] [--targets 32x,64x,128x]

writes benchmarks/results/pareto.json, .md and .png. `--merge` keeps the rows already in
pareto.json (same FP model and epochs) and replaces only the ones this run recomputes, so the
methods can run as separate processes. Without `--fp` the FP model is trained once and cached as
pareto_fp_<model>_<dataset>.pt. If results/pareto_bsq.json (written by pareto_bsq.py on the same
FP model) exists, its points are drawn as a BSQ curve. `--model digits_cnn --dataset digits` is
the same comparison at 1/100 of the compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MAX_PRUNE = 0.5
METHODS = ("abs", "ptq", "uniform")
UNIFORM_PAIRS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2))   # (w, a), BOPs halving each step
# The settings rows must share to sit in one table: the same FP model and training budget.
SAME_RUN = ("fp", "model", "dataset", "search_epochs", "ft_epochs", "lr", "ft_lr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp", type=Path, default=None,
                    help="FP checkpoint to start every method from (default: cached/trained)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="subset of abs,ptq (prune-then-quantize),uniform")
    ap.add_argument("--targets", default="32x,64x,128x")
    ap.add_argument("--fp-epochs", type=int, default=12)
    ap.add_argument("--search-epochs", type=int, default=8)
    ap.add_argument("--ft-epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01, help="ABS search learning rate")
    # Fine-tune trains with BN folded (no normalisation left): ResNet-20 diverges to 10% at
    # 0.003 and above from a 4/4 start, and trains at 0.001 (measured on digits32).
    ap.add_argument("--ft-lr", type=float, default=0.001,
                    help="fine-tune learning rate of every method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--uniform", default="8,4,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of an existing pareto.json of the same settings")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits32",
                    help="digits32 for ResNet-20; digits for the 8x8 digits_cnn")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        sys.exit(f"pareto.py: unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    results = args.results

    from abs_deploy import bops
    from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
    from abs_deploy.data import load_dataset
    from abs_deploy.pretrain import pretrain
    from abs_deploy.search.abs_search import abs_search
    from abs_deploy.search.finetune import finetune
    from abs_deploy.train import TrainConfig

    torch.set_num_threads(args.threads)
    results.mkdir(exist_ok=True)
    data = load_dataset(args.dataset)
    fp_path = args.fp or results / f"pareto_fp_{args.model}_{args.dataset}.pt"
    if fp_path.is_file():
        fp = load_checkpoint(fp_path, stages=("fp",))
    elif args.fp is not None:
        sys.exit(f"pareto.py: --fp {args.fp} does not exist")
    else:
        fp = pretrain(args.model, data, TrainConfig(epochs=args.fp_epochs, lr=0.1))
        save_checkpoint(fp, fp_path)
    if fp["input"].get("dataset") not in (None, args.dataset):
        sys.exit(f"pareto.py: {fp_path} was trained on {fp['input']['dataset']}, "
                 f"not {args.dataset}")
    fp_bops = fp["metrics"]["fp_bops"]
    _log(f"FP top-1 {fp['metrics']['top1']:.4f}, {fp_bops / 1e6:.1f} M BOPs")
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "merge")}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    settings["fp"] = str(fp_path.resolve())
    fresh = [not args.merge]
    search_cfg = TrainConfig(epochs=args.search_epochs, lr=args.lr, seed=args.seed)
    ft_cfg = TrainConfig(epochs=args.ft_epochs, lr=args.ft_lr, seed=args.seed)

    space = _Space(fp, data)

    def rows() -> list[dict]:
        return [] if fresh[0] else _previous_rows(results, settings)

    def add(row: dict) -> None:
        """Replace the row of the same method and point, write everything so far. The file is
        re-read first, so runs of different methods in parallel processes keep each other's."""
        kept = [r for r in rows() if (r["method"], r["label"], r["target"])
                != (row["method"], row["label"], row["target"])]
        fresh[0] = False
        _log(row)
        _write(results, fp, settings, kept + [row])

    for text in args.targets.split(",") if "abs" in methods or "ptq" in methods else []:
        target = bops.parse_bops(text, fp_bops)
        if "abs" in methods:
            t0 = time.perf_counter()
            searched = abs_search(fp, data, target, search_cfg, max_prune=MAX_PRUNE)
            tuned = finetune(searched, data, ft_cfg)
            add(_row("ABS", text, tuned, fp_bops, time.perf_counter() - t0,
                     searched["decision"], searched_top1=searched["metrics"]["top1"]))
        if "ptq" in methods:
            t0 = time.perf_counter()
            abs_rows = [r for r in rows() if r["method"] == "abs" and r["target"] == text]
            goal = abs_rows[0]["bops"] if abs_rows else target
            (w, a), frac = space.match(goal)
            ckpt = space.fixed((w, a), frac, "prune-then-quantize")
            ckpt = _qat(ckpt, data, search_cfg)
            add(_row(f"prune {frac:.0%} + {w}/{a}", text, finetune(ckpt, data, ft_cfg),
                     fp_bops, time.perf_counter() - t0, ckpt["decision"],
                     method="prune-then-quantize"))

    for b in (int(v) for v in args.uniform.split(",")) if "uniform" in methods else []:
        t0 = time.perf_counter()
        ckpt = _qat(space.fixed((b, b), 0.0, "uniform"), data, search_cfg)
        add(_row(f"uniform {b}/{b}", "", finetune(ckpt, data, ft_cfg), fp_bops,
                 time.perf_counter() - t0, ckpt["decision"], method="uniform"))

    _write(results, fp, settings, rows())
    print((results / "pareto.md").read_text())


def _previous_rows(results: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run with the same FP model and budget; another run's rows are an
    error rather than silently mixed in."""
    path = results / "pareto.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    prev = old.get("args", {})
    differ = [k for k in SAME_RUN if prev.get(k) != settings.get(k)]
    if differ:
        sys.exit(f"pareto.py: --merge: {path} is from a run with other "
                 f"{', '.join(differ)}; drop --merge or match them")
    return list(old["rows"])


def _write(results: Path, fp: dict, settings: dict, rows: list[dict]) -> None:
    """Results so far: written after every run, so a long benchmark cut short keeps them."""
    out = {"fp_top1": fp["metrics"]["top1"], "fp_bops": fp["metrics"]["fp_bops"],
           "args": settings, "rows": rows}
    bsq = _bsq_rows(results / "pareto_bsq.json")
    _atomic_write(results / "pareto.json", json.dumps(out, indent=1).encode())
    _atomic_write(results / "pareto.md", _markdown(out, bsq).encode())
    _plot(out, bsq, results / "pareto.png")


def _bsq_rows(path: Path) -> list[dict]:
    """The BSQ points another benchmark wrote: a list of dicts with bops and top1 (or a dict
    holding them under `points`/`rows`); none if the file is absent or unreadable, so this
    benchmark never depends on that one. top-1 may be a fraction or a percentage."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    points = data.get("points", data.get("rows", [])) if isinstance(data, dict) else data
    rows = []
    for p in points if isinstance(points, list) else []:
        if not (isinstance(p, dict) and p.get("bops") and p.get("top1") is not None):
            continue
        top1 = float(p["top1"])
        rows.append({"method": "bsq", "label": "BSQ", "target": str(p.get("target", "")),
                     "bops": float(p["bops"]), "top1": top1 / 100 if top1 > 1 else top1,
                     "ratio": float(p.get("ratio", 0.0)),
                     "seconds": float(p.get("seconds", 0.0))})
    return rows


def _atomic_write(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)            # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Space:
    """Uniform-bit, uniformly-pruned decisions of the FP model and their exact BOPs."""

    def __init__(self, fp: dict, data) -> None:
        from abs_deploy import bops, graph
        from abs_deploy.search.qmodel import model_from_checkpoint

        self.fp, self.data = fp, data
        model = model_from_checkpoint(fp)
        x = torch.zeros(data.input_shape)
        self.order = graph.layer_order(model, x)
        self.bn_of = graph.following_norm(model, x)
        self.groups = [g for g in graph.channel_groups(model, x) if g.prunable and g.producers]
        self.all_groups = graph.channel_groups(model, x)
        self.costs = bops.layer_costs(model, data.input_shape)
        self.norms = {g.id: _magnitude(model, g.producers) for g in self.groups}

    def kept(self, frac: float) -> dict[str, list[int]]:
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
        """The richest uniform (w, a) bits that reach `target` with at most MAX_PRUNE of each
        group pruned, and the pruned fraction that meets it. The pairs step the BOPs by 2x
        (8/8, 8/4, 4/4, 4/2, 2/2): with square bits only, a target between two of them was
        met by the lower one unpruned, far below it (32x became 4/4 at 62x)."""
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

    def fixed(self, bits: tuple[int, int], frac: float, method: str) -> dict:
        """A `searched` checkpoint of the FP weights at uniform bits with magnitude pruning."""
        from abs_deploy.checkpoint import make_checkpoint
        from abs_deploy.search.qmodel import make_decision, model_from_checkpoint, quantize_model
        from abs_deploy.search.uniform import prepare_quantizers

        model = model_from_checkpoint(self.fp)
        layer_bits = self.bits(*bits)
        quantize_model(model, {n: layer_bits[n] for n in self.order})
        prepare_quantizers(model, self.data)
        decision = make_decision(model, self.bn_of, self.kept(frac))
        return make_checkpoint("searched", self.fp["arch"], self.fp["input"],
                               self.fp["num_classes"], model.state_dict(), decision, {}, [],
                               method=method, bn_folded=False)


def _qat(ckpt: dict, data, cfg) -> dict:
    """QAT of a fixed decision with BatchNorm still in place (masks applied): what the ABS search
    phase is for ABS. It also repairs the percentile activation clips, which on ResNet-20/digits32
    cost the FP model 55 points even at 8 bits in eval mode (measured: 99.44% -> 45%)."""
    from abs_deploy.search.qmodel import model_from_checkpoint
    from abs_deploy.train import train

    model = model_from_checkpoint(ckpt)
    train(model, data, cfg)
    return {**ckpt, "state_dict": model.state_dict()}


def _magnitude(model, producers: list[str]) -> torch.Tensor:
    """Per-filter mean |w| over each producer's largest, averaged (the ABS filter norm)."""
    from abs_deploy.search.superbit import filter_norms
    return filter_norms([model.get_submodule(p).weight for p in producers])


def _row(label: str, target: str, ckpt: dict, fp_bops: float, seconds: float, decision: dict,
         method: str = "abs", **extra) -> dict:
    m = ckpt["metrics"]
    return {"method": method, "label": label, "target": target, "top1": m["top1"],
            "bops": m["bops"], "ratio": fp_bops / m["bops"], "seconds": seconds,
            "bits": {n: [d["w_bits"], d["a_bits"], len(d["kept"])] for n, d in decision.items()},
            **extra}


def _markdown(out: dict, bsq: list[dict]) -> str:
    a = out["args"]
    budget = a["search_epochs"] + a["ft_epochs"]
    lines = [f"# Accuracy vs BOPs, {a['model']} on {a['dataset']} "
             f"(FP top-1 {100 * out['fp_top1']:.2f}%, "
             f"{out['fp_bops'] / 1e6:,.0f} M BOPs)", "",
             f"FP model `{Path(a['fp']).name}`; ABS {a['search_epochs']} search + "
             f"{a['ft_epochs']} fine-tune epochs; uniform and prune-then-quantize "
             f"{a['search_epochs']} QAT (BN in place) + {a['ft_epochs']} fine-tune epochs "
             f"({budget} in all, from the FP weights); search/QAT lr {a['lr']}, fine-tune lr "
             f"{a['ft_lr']} (BN folded), batch 64, seed {a['seed']}, "
             "one run per point; first/last layer 8/8 for every method."
             + (" BSQ rows: results/pareto_bsq.json, same FP model, its own budget "
                "(see pareto_bsq.md)." if bsq else "")
             + " Top-1 on the 360 validation images: one image is 0.28 points. Seconds: wall "
             f"time with {a.get('threads', '?')} torch thread(s) per run on a machine that may "
             "have been shared; compare them with care.",
             "", "| method | target | BOPs (M) | FP/BOPs | top-1 % | time s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted(out["rows"] + bsq, key=lambda r: -r["bops"]):
        lines.append(f"| {r['label']} | {r['target']} | {r['bops'] / 1e6:,.1f} | "
                     f"{r['ratio']:.1f}x | {100 * r['top1']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(out: dict, bsq: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, label, style in (("abs", "ABS", "o-"), ("uniform", "uniform QAT", "s--"),
                                 ("prune-then-quantize", "prune-then-quantize", "^:"),
                                 ("bsq", "BSQ", "d-.")):
        pts = sorted((r["bops"] / 1e6, 100 * r["top1"]) for r in out["rows"] + bsq
                     if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.axhline(100 * out["fp_top1"], color="gray", lw=0.8, label="FP")
    ax.set_xscale("log")
    ax.set_xlabel("BOPs (M, log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{out['args']['model']} on {out['args']['dataset']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def _log(obj) -> None:
    print(obj if isinstance(obj, str) else {k: v for k, v in obj.items() if k != "bits"},
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
