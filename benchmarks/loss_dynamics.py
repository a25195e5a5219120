"""What a training run's loss does to its pairs, epoch by epoch: the measurements behind the
circle-loss and MoCo v3 findings in the README (issue 17).

Trains a recipe exactly as ``cl run`` does (``Trainer``, same data, augmentation, seeds) and, on
every step, records what the run folder does not:

- ``grad_norm``: the L2 norm of the gradient over all trainable parameters (after backward, before
  the optimiser step), ``param_norm`` (after the step), and ``update_ratio``: lr x grad_norm /
  param_norm, the relative size of the step SGD takes (without its momentum);
- for the metric-learning losses of XBM (contrastive, triplet, lifted, circle), the pairs the loss
  sees (batch and cross-batch memory): mean positive and negative cosine ``s_p`` / ``s_n``, the
  hardest of each per anchor, the share of anchors whose hardest negative is closer than their
  hardest positive, and for the circle loss the number of pairs that carry the gradient: the
  perplexity (exp of the entropy) of the softmax weights its log-sum-exp puts on the negatives and
  on the positives of an anchor;
- ``anchor_cos``: the mean cosine between different anchors of a batch (1 means collapsed);
- for momentum key encoders, ``key_lag``: the relative distance between key- and query-encoder
  parameters (0 means the key encoder is the query encoder).

Per-epoch means go to a JSON file and a Markdown table; kNN top-1 as the run's monitor logs it.

    .venv/bin/python benchmarks/loss_dynamics.py recipes/xbm.toml --set loss.kind=\\"circle\\" \\
        --set loss.margin=0.25 --set loss.gamma=80.0 --set lr=0.06 --name circle_readme
    .venv/bin/python benchmarks/loss_dynamics.py recipes/mocov3.toml --name mocov3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from cltool.display import Display
from cltool.losses import _pair_sets
from cltool.methods.xbm import XBM
from cltool.recipe import Recipe, load_recipe
from cltool.track import RunDir
from cltool.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def softmax_perplexity(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of softmax(logits) over each row's masked entries [B]: how many entries
    carry the row's log-sum-exp gradient (1: one pair takes it all)."""
    masked = logits.masked_fill(~mask, -math.inf)
    log_p = torch.log_softmax(masked, dim=1)
    entropy = -(log_p.exp() * log_p.masked_fill(~mask, 0.0)).sum(1)
    return entropy.exp()


def pair_statistics(
    recipe: Recipe,
    emb: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
) -> dict[str, float]:
    """What one step's metric loss sees: similarities of its positive and negative pairs."""
    emb = emb.detach()
    candidates, _, positive, negative = _pair_sets(emb, labels, ref, ref_labels)
    s = F.normalize(emb, dim=1) @ F.normalize(candidates, dim=1).T  # [B, M]
    valid = positive.any(1) & negative.any(1)
    s, positive, negative = s[valid], positive[valid], negative[valid]
    hardest_p = s.masked_fill(~positive, math.inf).min(1).values
    hardest_n = s.masked_fill(~negative, -math.inf).max(1).values
    stats = {
        "s_p": float(s[positive].mean()),
        "s_n": float(s[negative].mean()),
        "hardest_p": float(hardest_p.mean()),
        "hardest_n": float(hardest_n.mean()),
        "violated": float((hardest_n > hardest_p).float().mean()),
        "pairs": float(positive.sum(1).float().mean() + negative.sum(1).float().mean()),
    }
    if recipe.loss.kind == "circle":
        m, gamma = recipe.loss.margin, recipe.loss.gamma
        logit_p = -gamma * F.relu(1 + m - s) * (s - (1 - m))
        logit_n = gamma * F.relu(s + m) * (s - m)
        stats["circle_neg_pairs"] = float(softmax_perplexity(logit_n, negative).mean())
        stats["circle_pos_pairs"] = float(softmax_perplexity(logit_p, positive).mean())
        stats["active_neg_share"] = float(((s > -m) & negative).sum() / negative.sum())
    eye = torch.eye(len(emb), dtype=torch.bool)
    unit = F.normalize(emb, dim=1)
    stats["anchor_cos"] = float((unit @ unit.T)[~eye].mean())
    return stats


def parameter_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||θ_a - θ_b|| / ||θ_b||."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    diff = sum(float((p.detach() - q.detach()).pow(2).sum()) for p, q in pairs)
    norm = sum(float(q.detach().pow(2).sum()) for q in b.parameters())
    return math.sqrt(diff / norm)


class Probe:
    """Wraps a Trainer's step and, for XBM, its loss, collecting per-step statistics."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.step_stats: dict[str, float] = {}
        self.epochs: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        method = trainer.method
        if isinstance(method, XBM):
            loss = method.loss

            def observed(e, y, re, ry):  # type: ignore[no-untyped-def]
                self.step_stats.update(pair_statistics(trainer.recipe, e, y, re, ry))
                return loss(e, y, re, ry)

            method.loss = observed
        train_step = trainer.train_step

        def step(images, indices, labels, epoch, step_index):  # type: ignore[no-untyped-def]
            logs = train_step(images, indices, labels, epoch, step_index)
            self.record(epoch, logs)
            return logs

        trainer.train_step = step  # type: ignore[method-assign]

    def record(self, epoch: int, logs: dict[str, torch.Tensor]) -> None:
        trainable = [p for p in self.trainer.method.parameters() if p.requires_grad]
        grads = [p.grad for p in trainable if p.grad is not None]
        grad_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        param_norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in trainable))
        row = self.epochs[epoch]
        row["loss"].append(float(logs["loss"]))
        row["grad_norm"].append(grad_norm)
        row["param_norm"].append(param_norm)
        row["update_ratio"].append(float(logs["lr"]) * grad_norm / param_norm)
        method = self.trainer.method
        if getattr(method, "momentum_keys", False) and hasattr(method, "encoder_k"):
            row["key_lag"].append(parameter_distance(method.encoder_k, method.encoder_q))
        for key, value in self.step_stats.items():
            row[key].append(value)
        self.step_stats = {}


def run(recipe: Recipe) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-epoch means of the probe's statistics, and the run's final metrics."""
    monitor: dict[int, float] = {}

    def log(record: dict[str, Any]) -> None:
        if record.get("kind") in ("epoch", "eval") and "knn_top1" in record:
            monitor[int(record["epoch"])] = float(record["knn_top1"])

    with tempfile.TemporaryDirectory() as folder:
        display = Display(Console(quiet=True), None, quiet=True)
        trainer = Trainer(recipe, RunDir(Path(folder)), display, log)
        probe = Probe(trainer)
        summary = trainer.run()
    final = {k: v for k, v in summary.items() if k.startswith(("knn_top1", "linear_top1"))}
    rows = []
    for epoch, values in sorted(probe.epochs.items()):
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update({k: statistics.fmean(v) for k, v in values.items()})
        if epoch in monitor:
            row["knn_top1"] = monitor[epoch]
        rows.append(row)
    return rows, final


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [_fmt(row.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--name", required=True, help="results/dynamics_<name>.{json,md}")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    rows, final = run(recipe)
    RESULTS.mkdir(exist_ok=True)
    header = f"`{args.recipe}` " + " ".join(f"--set {o}" for o in args.overrides)
    (RESULTS / f"dynamics_{args.name}.json").write_text(
        json.dumps(
            {"recipe": args.recipe, "overrides": args.overrides, "final": final, "epochs": rows},
            indent=1,
        )
    )
    ending = ", ".join(f"{k} {v:.1f}" for k, v in final.items())
    text = f"{header}\n\n{markdown(rows)}\nfinal: {ending}\n"
    (RESULTS / f"dynamics_{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
