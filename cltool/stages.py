"""Stages: runs that start from another run's encoder, after pretraining (SimCLR v2's steps 2
and 3, and the semi-supervised protocol every SSL paper reports label efficiency with).

- ``finetune``: the parent's encoder, cut after head layer ``finetune.start_layer`` (0: the
  backbone), plus a linear classifier, all trained on a labelled fraction of the images;
- ``linear``: the same network with the encoder frozen: a linear probe on the same labels;
- ``supervised``: the same network from a random initialisation on the same labels and budget,
  the baseline that says what pretraining bought;
- ``distill``: a student (same architecture, or another backbone or width) trained on all
  training images, unlabelled, against the softened predictions of the ``finetune`` stage on
  ``distill.fraction`` (its parent), optionally with the labels too.

A stage is a run: its own folder ``<pretraining run>/stages/<stage id>/`` with ``stage.json``
(what it is), ``state.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt``,
``train.log`` and ``lock.json`` while trained, so locking, resuming and the state rule apply
unchanged. Its id is a hash of its settings and its parent's id (the pretraining run's, or for
``distill`` the teacher stage's), so a stage is found again however it is asked for (``cl run``
of a pipeline recipe, a sweep, ``cl eval``). The settings come from the pretraining recipe's
``[stages]``, ``[finetune]`` and ``[distill]`` tables, which are left out of the run's own id:
adding stages to a finished run never retrains it.

This module imports no torch: ``cl status`` and ``cl report`` read stages through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cltool.errors import InputError
from cltool.recipe import STAGE_KINDS, Recipe
from cltool.track import RunDir, read_json

STAGES = "stages"
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class StageDir(RunDir):
    """A stage's folder: a run folder whose description is ``stage.json``, not a recipe."""

    @property
    def config(self) -> Path:
        return self.path / STAGE_FILE

    def spec(self) -> dict[str, Any] | None:
        return read_json(self.config)


@dataclass(frozen=True)
class Stage:
    """One stage of a pretraining run: what it trains, on which labels, from which parent."""

    kind: str
    fraction: float  # the labelled fraction (distill: its teacher's)
    settings: dict[str, Any]  # its table, every value resolved against the parent
    parent_id: str  # the run or stage whose weights it starts from
    run_id: str  # the pretraining run it belongs to

    @property
    def stage_id(self) -> str:
        """A hash of everything the stage computes from: settings and parent."""
        blob = json.dumps(
            {
                "kind": self.kind,
                "fraction": self.fraction,
                "settings": self.settings,
                "parent": self.parent_id,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def label(self) -> str:
        """``finetune 1%``, ``distill (teacher: 10%)``: how tables and progress name it."""
        if self.kind == "distill":
            return f"distill (teacher: {percent(self.fraction)}%)"
        return f"{self.kind} {percent(self.fraction)}%"

    @property
    def column(self) -> str:
        """The report column of its top-1: ``finetune_1pct_top1``, ``distill_top1``.

        A setting asked apart from the pipeline's usual (a head layer other than the parent's,
        a student at another width) is in the name, so an ablation gets its own column."""
        parts = [self.kind]
        if self.kind != "distill":
            parts.append(f"{percent(self.fraction)}pct")
        parts.extend(self.settings.get("variant", []))
        return "_".join(parts) + "_top1"

    def folder(self, run_dir: RunDir) -> StageDir:
        return StageDir(run_dir.path / STAGES / self.stage_id)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fraction": self.fraction,
            "settings": self.settings,
            "parent": self.parent_id,
            "run_id": self.run_id,
            "stage_id": self.stage_id,
            "label": self.label,
            "column": self.column,
        }

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> Stage:
        return cls(spec["kind"], spec["fraction"], spec["settings"], spec["parent"], spec["run_id"])


def percent(fraction: float) -> str:
    """0.01 -> ``1``, 0.005 -> ``0.5``: a fraction as the percentage a column name holds."""
    return f"{fraction * 100:.6g}"


def start_layer(recipe: Recipe) -> int:
    """The head layer the classifier goes after; -1 means the parent's evaluation layer."""
    layer = recipe.finetune.start_layer
    return recipe.model.eval_head_layers if layer == -1 else layer


def check_start_layer(recipe: Recipe, source: str) -> None:
    """An unknown head layer, refused with the layers there are."""
    layer, hidden = start_layer(recipe), recipe.model.head_layers - 2
    if layer > hidden:
        raise InputError(
            f"{source}: finetune.start_layer = {layer}, but the run's projection head has "
            f"{hidden} hidden layer{'s' if hidden != 1 else ''} before its output "
            f"(model.head_layers = {recipe.model.head_layers}): choose 0 (the backbone)"
            + (f" to {hidden}" if hidden else "")
        )


def _finetune_settings(recipe: Recipe) -> dict[str, Any]:
    settings = dataclasses.asdict(recipe.finetune)
    settings["seed"] += recipe.train.seed
    settings["start_layer"] = start_layer(recipe)
    settings["subset_seed"] = recipe.stages.subset_seed
    layer = settings["start_layer"]
    if layer != recipe.model.eval_head_layers:  # an ablation: its own report column
        settings["variant"] = ["backbone" if layer == 0 else f"head{layer}"]
    return settings


def _distill_settings(recipe: Recipe) -> dict[str, Any]:
    settings = dataclasses.asdict(recipe.distill)
    settings["seed"] += recipe.train.seed
    teacher = recipe.model
    if settings["backbone"] == "same":
        settings["backbone"] = teacher.backbone
    if settings["width"] == 0:
        settings["width"] = teacher.width
    settings["subset_seed"] = recipe.stages.subset_seed
    variant = []
    if settings["backbone"] != teacher.backbone:
        variant.append(settings["backbone"])
    if settings["backbone"] == "small_cnn" and settings["width"] != teacher.width:
        variant.append(f"w{settings['width']}")
    if settings["labels"]:
        variant.append("labels")
    settings["variant"] = variant
    return settings


def plan_stages(recipe: Recipe, kinds: list[str] | None = None) -> list[Stage]:
    """The stages of a pretraining run, in the order they run: each after its parent.

    ``kinds`` (default ``stages.run``) says which; a ``distill`` brings the ``finetune`` stage
    on ``distill.fraction`` (its teacher) with it."""
    kinds = list(recipe.stages.run if kinds is None else kinds)
    run_id = recipe.fingerprint
    fractions = list(dict.fromkeys(float(f) for f in recipe.stages.fractions))
    teacher_fraction = float(recipe.distill.fraction)
    stages: list[Stage] = []
    finetune = _finetune_settings(recipe)
    for kind in ("finetune", "linear", "supervised"):
        wanted = kind in kinds
        for fraction in fractions if wanted else []:
            stages.append(Stage(kind, fraction, finetune, run_id, run_id))
    if "distill" in kinds:
        teacher = Stage("finetune", teacher_fraction, finetune, run_id, run_id)
        if teacher not in stages:
            stages.insert(0, teacher)
        settings = _distill_settings(recipe)
        stages.append(Stage("distill", teacher_fraction, settings, teacher.stage_id, run_id))
    return stages


def stage_dirs(run_dir: RunDir) -> list[StageDir]:
    """The stage folders of a run that hold a readable ``stage.json``, oldest first."""
    folder = run_dir.path / STAGES
    if not folder.is_dir():
        return []
    found = [StageDir(p) for p in folder.iterdir() if (p / STAGE_FILE).is_file()]
    found = [d for d in found if d.spec() is not None]
    return sorted(found, key=lambda d: d.config.stat().st_mtime)


def column_clashes(stages: list[Stage], run_dir: RunDir) -> list[str]:
    """A line for each of ``stages`` whose report column a stage of the run with other settings
    already has: only ablation settings name a column, so ``cl report`` would show just the one
    trained last (each keeps its own folder and ``summary.json``)."""
    holders: dict[str, list[str]] = {}
    for folder in stage_dirs(run_dir):
        spec = folder.spec() or {}
        holders.setdefault(str(spec.get("column")), []).append(str(spec.get("stage_id")))
    lines = []
    for stage in stages:
        others = [sid for sid in holders.get(stage.column, []) if sid != stage.stage_id]
        if others:
            lines.append(
                f"note: {stage.label} shares the report column {stage.column} with stage "
                f"{', '.join(others)} of this run (other settings): cl report shows the one "
                "trained last; each stage's summary.json keeps its own top-1"
            )
    return lines


def stage_metrics(run_dir: RunDir) -> dict[str, float]:
    """The top-1 of each finished stage of a run under its report column
    (``finetune_1pct_top1``, ...), the latest stage where two share a column."""
    metrics: dict[str, float] = {}
    for folder in stage_dirs(run_dir):
        summary = folder.summary()
        if folder.is_done() and summary and isinstance(summary.get("top1"), int | float):
            metrics[str(summary.get("column"))] = summary["top1"]
    return metrics


#: A stage's report column: a labelled kind names its fraction (so a run's own ``linear_top1``
#: is not one), ``distill`` its variant only.
_COLUMN = re.compile(
    rf"^(({'|'.join(k for k in STAGE_KINDS if k != 'distill')})_[0-9.]+pct|distill)(_\w+)?_top1$"
)


def is_stage_metric(name: str) -> bool:
    """Whether a summary key is a stage's report column."""
    return _COLUMN.match(name) is not None
