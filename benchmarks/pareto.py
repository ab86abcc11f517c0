"""Accuracy vs BOPs (default ResNet-20 on digits32): ABS at several targets, uniform QAT
(8/8, 4/4, 2/2), and prune-then-quantize (magnitude filter pruning, then uniform QAT) at ABS's BOPs.

Every method ends in the same deployable form and the same training: the decision is trained by
`finetune` (BN folded, fixed bits, masks). ABS gets `--search-epochs` of search plus
`--ft-epochs` of fine-tune; the baselines get the same total number of epochs of fine-tune from
the FP weights, so no method has more training than another. First and last layer at 8/8 for
all.

Prune-then-quantize: for each ABS result, the highest uniform bitwidth that can reach its BOPs
with at most `max_prune` of every prunable group removed, then the same fraction of filters
removed from every prunable group (smallest mean |w| first), found by bisection on the BOPs.

    python benchmarks/pareto.py [--targets 32x,64x,128x] [--fp-epochs 12] ...

writes benchmarks/results/pareto.json, .md and .png (the FP checkpoint is cached as
pareto_fp_<model>_<dataset>.pt beside them). `--model digits_cnn --dataset digits` is the same
comparison at 1/100 of the compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MAX_PRUNE = 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="32x,64x,128x")
    ap.add_argument("--fp-epochs", type=int, default=12)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--uniform", default="8,4,2")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits32",
                    help="digits32 for ResNet-20; digits for the 8x8 digits_cnn")
    args = ap.parse_args()
    results = args.results

    from abs_deploy import bops
    from abs_deploy.checkpoint import load_checkpoint, save_checkpoint
    from abs_deploy.data import load_dataset
    from abs_deploy.pretrain import pretrain
    from abs_deploy.search.abs_search import abs_search
    from abs_deploy.search.finetune import finetune
    from abs_deploy.train import TrainConfig

    torch.set_num_threads(2)
    results.mkdir(exist_ok=True)
    data = load_dataset(args.dataset)
    fp_path = results / f"pareto_fp_{args.model}_{args.dataset}.pt"
    if fp_path.is_file():
        fp = load_checkpoint(fp_path)
    else:
        fp = pretrain(args.model, data, TrainConfig(epochs=args.fp_epochs, lr=0.1))
        save_checkpoint(fp, fp_path)
    fp_bops = fp["metrics"]["fp_bops"]
    _log(f"FP top-1 {fp['metrics']['top1']:.4f}, {fp_bops / 1e6:.1f} M BOPs")
    ft_cfg = TrainConfig(epochs=args.ft_epochs, lr=0.01)
    base_cfg = TrainConfig(epochs=args.search_epochs + args.ft_epochs, lr=0.01)
    space = _Space(fp, data)
    rows = []

    for text in args.targets.split(","):
        target = bops.parse_bops(text, fp_bops)
        t0 = time.perf_counter()
        searched = abs_search(fp, data, target, TrainConfig(epochs=args.search_epochs, lr=0.01),
                              max_prune=MAX_PRUNE)
        tuned = finetune(searched, data, ft_cfg)
        rows.append(_row("ABS", text, tuned, fp_bops, time.perf_counter() - t0,
                         searched["decision"]))
        _log(rows[-1])
        _write(results, fp, args, rows)

        t0 = time.perf_counter()
        bits, frac = space.match(tuned["metrics"]["bops"])
        ckpt = space.fixed(bits, frac, "prune-then-quantize")
        rows.append(_row(f"prune {frac:.0%} + {bits}/{bits}", text,
                         finetune(ckpt, data, base_cfg), fp_bops, time.perf_counter() - t0,
                         ckpt["decision"], method="prune-then-quantize"))
        _log(rows[-1])
        _write(results, fp, args, rows)

    for b in (int(v) for v in args.uniform.split(",")):
        t0 = time.perf_counter()
        ckpt = space.fixed(b, 0.0, "uniform")
        rows.append(_row(f"uniform {b}/{b}", "", finetune(ckpt, data, base_cfg), fp_bops,
                         time.perf_counter() - t0, ckpt["decision"], method="uniform"))
        _log(rows[-1])
        _write(results, fp, args, rows)

    _write(results, fp, args, rows)
    print((results / "pareto.md").read_text())


def _write(results: Path, fp: dict, args, rows: list[dict]) -> None:
    """Results so far: written after every run, so a long benchmark cut short keeps them."""
    out = {"fp_top1": fp["metrics"]["top1"], "fp_bops": fp["metrics"]["fp_bops"],
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "rows": rows}
    (results / "pareto.json").write_text(json.dumps(out, indent=1))
    (results / "pareto.md").write_text(_markdown(out))
    _plot(out, results / "pareto.png")


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

    def bits(self, b: int) -> dict[str, tuple[int, int]]:
        from abs_deploy import bops
        return bops.default_bits(self.costs, b, b, 8)

    def bops(self, b: int, frac: float) -> float:
        from abs_deploy import bops, graph
        kept = self.kept(frac)
        rows = bops.bops_table(self.costs, self.bits(b), {n: len(k) for n, k in kept.items()},
                               graph.input_kept(self.all_groups, kept))
        return float(bops.totals(rows)["bops"])

    def match(self, target: float) -> tuple[int, float]:
        """The highest uniform bits reachable with pruning, and the fraction that matches."""
        for b in (8, 4, 2):
            if self.bops(b, MAX_PRUNE) <= target:
                break
        lo, hi = 0.0, MAX_PRUNE
        if self.bops(b, 0.0) <= target:
            return b, 0.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.bops(b, mid) > target else (lo, mid)
        return b, hi

    def fixed(self, b: int, frac: float, method: str) -> dict:
        """A `searched` checkpoint of the FP weights at uniform bits with magnitude pruning."""
        from abs_deploy.checkpoint import make_checkpoint
        from abs_deploy.search.qmodel import make_decision, model_from_checkpoint, quantize_model
        from abs_deploy.search.uniform import prepare_quantizers

        model = model_from_checkpoint(self.fp)
        bits = self.bits(b)
        quantize_model(model, {n: bits[n] for n in self.order})
        prepare_quantizers(model, self.data)
        decision = make_decision(model, self.bn_of, self.kept(frac))
        return make_checkpoint("searched", self.fp["arch"], self.fp["input"],
                               self.fp["num_classes"], model.state_dict(), decision, {}, [],
                               method=method, bn_folded=False)


def _magnitude(model, producers: list[str]) -> torch.Tensor:
    """Per-filter mean |w| over each producer's largest, averaged (the ABS filter norm)."""
    from abs_deploy.search.superbit import filter_norms
    return filter_norms([model.get_submodule(p).weight for p in producers])


def _row(label: str, target: str, ckpt: dict, fp_bops: float, seconds: float, decision: dict,
         method: str = "abs") -> dict:
    m = ckpt["metrics"]
    pruned = sum(1 for d in decision.values() if d["kept"])
    return {"method": method, "label": label, "target": target, "top1": m["top1"],
            "bops": m["bops"], "ratio": fp_bops / m["bops"], "seconds": seconds,
            "bits": {n: [d["w_bits"], d["a_bits"], len(d["kept"])] for n, d in decision.items()},
            "layers": pruned}


def _markdown(out: dict) -> str:
    a = out["args"]
    lines = [f"# Accuracy vs BOPs, {a['model']} on {a['dataset']} "
             f"(FP top-1 {100 * out['fp_top1']:.2f}%, "
             f"{out['fp_bops'] / 1e6:,.0f} M BOPs)", "",
             f"FP {a['fp_epochs']} epochs; ABS {a['search_epochs']} search + {a['ft_epochs']} "
             f"fine-tune epochs; baselines {a['search_epochs'] + a['ft_epochs']} fine-tune epochs.",
             "", "| method | target | BOPs (M) | FP/BOPs | top-1 % | time s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted(out["rows"], key=lambda r: -r["bops"]):
        lines.append(f"| {r['label']} | {r['target']} | {r['bops'] / 1e6:,.1f} | "
                     f"{r['ratio']:.1f}x | {100 * r['top1']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in (("abs", "o-"), ("uniform", "s--"), ("prune-then-quantize", "^:")):
        pts = sorted((r["bops"] / 1e6, 100 * r["top1"]) for r in out["rows"]
                     if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=method)
    ax.axhline(100 * out["fp_top1"], color="gray", lw=0.8, label="FP")
    ax.set_xscale("log")
    ax.set_xlabel("BOPs (M, log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{out['args']['model']} on {out['args']['dataset']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _log(obj) -> None:
    print(obj if isinstance(obj, str) else {k: v for k, v in obj.items() if k != "bits"},
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
