"""Training one stage (:mod:`cltool.stages`): the network, the labelled images, the loop.

The loop follows :mod:`cltool.train`'s rules for exact resume: the data order of an epoch and
the augmentation of a step come from generators seeded by ``(seed, epoch, step)``, the learning
rate is a pure function of the step, and a checkpoint at an epoch boundary (or where a stop was
asked) holds the network, the optimiser and the counters. A stage killed at any point and run
again ends with the metrics of one never interrupted.

Networks: the classifier of ``finetune``, ``linear`` and ``supervised`` is the evaluation
network of the parent's encoder cut after ``start_layer`` head layers, then one linear layer to
the classes; ``linear`` freezes everything before that layer (BatchNorm statistics included),
``supervised`` starts it from a random initialisation. ``distill`` trains a student of that
shape (its backbone and width as asked) from a random initialisation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cltool.augment import TwoViewAugment, normalize
from cltool.checkpoint import Resumable, Stateful, read_checkpoint
from cltool.data import ImageSet, load_dataset
from cltool.device import resolve_device
from cltool.display import Display
from cltool.errors import InputError
from cltool.labels import check_fraction, labelled_subset
from cltool.losses import classification_loss, distillation_loss
from cltool.methods import build_method
from cltool.methods.parts import build_encoder, evaluation_network
from cltool.recipe import AugmentConfig, Recipe
from cltool.stages import Stage, StageDir
from cltool.track import RunDir
from cltool.train import StopRequested, batches_of_epoch, step_seed


def classifier(encoder: nn.Module, start_layer: int, num_classes: int) -> nn.Sequential:
    """The encoder cut after ``start_layer`` hidden head layers, then a linear classifier."""
    features = evaluation_network(encoder, start_layer)
    width = (
        encoder.feature_dim if start_layer == 0 else encoder.head[start_layer - 1][0].out_features
    )
    return nn.Sequential(features, nn.Linear(width, num_classes))


def load_encoder(recipe: Recipe, run_dir: RunDir, data: ImageSet) -> nn.Module:
    """The query encoder of a finished run, from its checkpoint, on the CPU."""
    method = build_method(recipe, data.channels, len(data.train_x), data.num_classes)
    blob = finished_checkpoint(run_dir)
    method.load_state_dict(blob["method"])
    return method.query_encoder


def finished_checkpoint(folder: RunDir | StageDir) -> dict[str, Any]:
    """The checkpoint of a finished run or stage, which every finished one has."""
    fix = "rerun the run with --force"
    blob = read_checkpoint(folder.checkpoint, fix=fix, error=InputError)
    if blob is None:
        raise InputError(f"{folder.checkpoint}: no checkpoint; {fix}")
    return blob


def finetune_augment(recipe: Recipe) -> AugmentConfig:
    """The parent's geometric augmentation (crop, rotation, flip) without colour changes, as
    SimCLR v2 fine-tunes with crops and flips only."""
    return dataclasses.replace(
        recipe.augment, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, noise_std=0.0
    )


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps, a pure function of the step."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


@dataclass
class StageState:
    """What a stage's checkpoint holds besides the network and optimiser states."""

    epoch: int = 0
    global_step: int = 0
    images_seen: int = 0
    wall_s: float = 0.0
    resumed_from_step: int | None = None


class StageTrainer(Resumable):
    """One stage from its parent's checkpoint to its test top-1."""

    def __init__(
        self,
        stage: Stage,
        recipe: Recipe,
        run_dir: RunDir,
        stage_dir: StageDir,
        display: Display,
        log: Callable[[dict[str, Any]], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.stage, self.recipe, self.stage_dir = stage, recipe, stage_dir
        self.display, self.log, self.should_stop = display, log, should_stop
        self.cfg = stage.settings
        self.device = resolve_device(recipe.train.device)
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.data = load_dataset(recipe.data)
        labels = self.data.train_y.numpy()
        self.labelled = labelled_positions(
            labels, stage.fraction, self.cfg["subset_seed"], f"stage {stage.label}"
        )
        # distill learns from every image; the others from the labelled ones only
        self.train_indices = torch.arange(len(labels)) if stage.kind == "distill" else self.labelled
        augment_cfg = finetune_augment(recipe)
        self.augment = (
            TwoViewAugment(augment_cfg, recipe.data.image_size, self.data.mean, self.data.std)
            if self.cfg.get("augment", True)
            else None
        )
        self.teacher: nn.Module | None = None
        self.net = self._build(run_dir).to(self.device)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = self._optimizer(trainable)
        self.steps_per_epoch = len(self.epoch_batches(0))
        self.total_steps = self.steps_per_epoch * self.cfg["epochs"]
        self.state = StageState()

    # -- networks ------------------------------------------------------------------------------

    def _build(self, run_dir: RunDir) -> nn.Module:
        recipe, stage, classes = self.recipe, self.stage, self.data.num_classes
        layer = self.cfg["start_layer"] if stage.kind != "distill" else None
        torch.manual_seed(self.cfg["seed"])
        if stage.kind in ("finetune", "linear"):
            encoder = load_encoder(recipe, run_dir, self.data)
            net = classifier(encoder, layer, classes)
            if stage.kind == "linear":
                net[0].requires_grad_(False)
            return net
        if stage.kind == "supervised":
            return classifier(build_encoder(recipe.model, self.data.channels), layer, classes)
        teacher_stage = self._teacher_stage(run_dir)
        teacher_layer = teacher_stage.settings["start_layer"]
        encoder = build_encoder(recipe.model, self.data.channels)
        teacher = classifier(encoder, teacher_layer, classes)
        teacher_dir = teacher_stage.folder(run_dir)
        teacher.load_state_dict(finished_checkpoint(teacher_dir)["net"])
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher_top1 = (teacher_dir.summary() or {}).get("top1")
        student_model = dataclasses.replace(
            recipe.model, backbone=self.cfg["backbone"], width=self.cfg["width"]
        )
        torch.manual_seed(self.cfg["seed"])
        student = build_encoder(student_model, self.data.channels)
        return classifier(student, teacher_layer, classes)

    def _teacher_stage(self, run_dir: RunDir) -> Stage:
        from cltool.stages import stage_dirs

        for folder in stage_dirs(run_dir):
            spec = folder.spec() or {}
            if spec.get("stage_id") == self.stage.parent_id and folder.is_done():
                return Stage.from_json(spec)
        raise InputError(
            f"stage {self.stage.label}: its teacher, stage {self.stage.parent_id} (finetune "
            f"{self.stage.fraction * 100:g}%), is not finished in {run_dir.path}: run it first"
        )

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg["optimizer"] == "adamw":
            return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        return torch.optim.SGD(
            params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
        )

    def train_mode(self) -> None:
        """Training mode, except for what the linear probe keeps frozen."""
        self.net.train()
        if self.stage.kind == "linear":
            self.net[0].eval()

    # -- the loop ------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Positions into ``train_indices``, shuffled per epoch from the stage's seed."""
        n = len(self.train_indices)
        return batches_of_epoch(n, min(self.cfg["batch_size"], n), self.cfg["seed"], epoch)

    def inputs(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The step's view of uint8 ``images``: augmented from the step's seed, or plain."""
        images = images.to(self.device)
        if self.augment is None:
            return normalize(images, self.data.mean, self.data.std)
        generator = torch.Generator().manual_seed(step_seed(self.cfg["seed"], epoch, step))
        return self.augment.view(images, generator)

    def step_loss(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The loss of one batch; ``indices`` are training-set indices."""
        labels = self.data.train_y[indices].to(self.device)
        logits = self.net(x)
        if self.teacher is None:
            return classification_loss(logits, labels)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss = distillation_loss(logits, teacher_logits, self.cfg["T"])
        if self.cfg["labels"]:
            labelled = torch.isin(indices, self.labelled).to(self.device)
            if labelled.any():
                loss = loss + classification_loss(logits[labelled], labels[labelled])
        return loss

    def run(self) -> dict[str, Any]:
        resumed = self.load_checkpoint()
        if resumed:
            self.stage_dir.truncate_metrics(self.state.global_step)
            self.display.message(
                f"resuming {self.stage.label} from step {self.state.global_step} "
                f"(epoch {self.state.epoch + 1})"
            )
        self.wall_before, self.started = self.state.wall_s, time.perf_counter()
        self.display.start(self.total_steps, self.state.global_step, self.state.epoch)
        for epoch in range(self.state.epoch, self.cfg["epochs"]):
            self.train_epoch(epoch)
        self.display.finish()
        wall_s = self.elapsed()
        with self.display.phase(f"evaluating {self.stage.label} (test top-1)"):
            top1 = self.test_top1()
        self.log(
            {"kind": "eval", "epoch": self.cfg["epochs"] - 1, "global_step": self.state.global_step}
            | {"top1": top1}
        )
        metrics: dict[str, Any] = {
            "top1": top1,
            "num_labelled": len(self.labelled),
            "num_train": len(self.train_indices),
            "epochs_done": self.state.epoch,
            "global_step": self.state.global_step,
            "wall_s": wall_s,
            "imgs_per_s": self.state.images_seen / max(wall_s, 1e-9),
            "resumed_from_step": self.state.resumed_from_step,
            "device": str(self.device),
        }
        if self.teacher is not None:
            metrics["teacher_top1"] = self.teacher_top1
        return metrics

    def train_epoch(self, epoch: int) -> None:
        self.train_mode()
        loss_sum, batches = 0.0, self.epoch_batches(epoch)
        for step, positions in enumerate(batches):
            indices = self.train_indices[positions]
            lr = cosine_lr(self.cfg["lr"], self.state.global_step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.step_loss(self.inputs(self.data.train_x[indices], epoch, step), indices)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.state.global_step += 1
            self.state.images_seen += len(indices)
            loss_sum += float(loss.detach())
            self.display.update(
                self.state.global_step, epoch, {"loss": float(loss.detach()), "lr": lr}
            )
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "global_step": self.state.global_step,
            "loss": loss_sum / len(batches),
        }
        self.log(record)
        self.display.epoch_end(epoch, self.cfg["epochs"], record)
        self.state.epoch = epoch + 1
        self.checkpoint()
        if self.should_stop() and self.state.epoch < self.cfg["epochs"]:
            raise StopRequested

    @torch.no_grad()
    def test_top1(self) -> float:
        self.net.eval()
        correct = 0
        for i in range(0, len(self.data.test_x), 512):
            x = normalize(
                self.data.test_x[i : i + 512].to(self.device), self.data.mean, self.data.std
            )
            predicted = self.net(x).argmax(1).cpu()
            correct += int((predicted == self.data.test_y[i : i + 512]).sum())
        return 100.0 * correct / len(self.data.test_x)

    # -- checkpoints ---------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    counters = StageState
    unreadable_fix = "rerun with --force to start the stage over"

    def checkpoint(self) -> None:
        self.state.wall_s = self.elapsed()
        self.write_training_checkpoint()

    def checkpoint_file(self) -> Path:
        return self.stage_dir.checkpoint

    def saved_parts(self) -> dict[str, Stateful]:
        return {"net": self.net, "optimizer": self.optimizer}

    def identity(self) -> dict[str, Any]:
        return {"stage_id": self.stage.stage_id}


def labelled_positions(
    labels: np.ndarray, fraction: float, subset_seed: int, source: str
) -> torch.Tensor:
    """Indices of the training images that keep their label, after refusing a fraction that
    leaves a class without one (``source`` names what asked for it)."""
    check_fraction(labels, fraction, source)
    return torch.from_numpy(labelled_subset(labels, fraction, subset_seed))


def labelled_indices(recipe: Recipe, fraction: float) -> torch.Tensor:
    """The training images every labelled stage of ``recipe`` trains on at ``fraction``: a
    function of its data set and ``stages.subset_seed`` only."""
    labels = load_dataset(recipe.data).train_y.numpy()
    return labelled_positions(labels, fraction, recipe.stages.subset_seed, "stages.fractions")
