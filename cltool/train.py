"""The training loop: data -> two views -> method -> loss -> step, with exact resume.

Every random draw of a step (the data order of its epoch, the augmentation of its batch) comes
from a generator seeded by ``(seed, epoch, step)``, and the learning rate and momentum are pure
functions of the step. A checkpoint taken at any step boundary therefore resumes to exactly the
run that was never interrupted (to float round-off on the same machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltool import diagnostics, dist, evaluate
from cltool.augment import TwoViewAugment, normalize
from cltool.checkpoint import Resumable, Stateful
from cltool.data import ImageSet, load_dataset
from cltool.device import (
    check_compile,
    check_sync_bn,
    compile_encoders,
    resident_images,
    resolve_device,
)
from cltool.display import Display
from cltool.methods import Progress, build_method
from cltool.recipe import Recipe, check_world_size
from cltool.track import RunDir


class StopRequested(Exception):
    """Raised at a step boundary after a checkpoint was written, when a stop was asked for."""


def step_seed(seed: int, epoch: int, step: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, step)."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + step + 1


def learning_rate(recipe: Recipe, global_step: int, steps_per_epoch: int) -> float:
    """Warm-up then constant or cosine decay, as a pure function of the step."""
    optim = recipe.optim
    total = recipe.train.epochs * steps_per_epoch
    warmup = optim.warmup_epochs * steps_per_epoch
    if global_step < warmup:
        return optim.lr * (global_step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    progress = (global_step - warmup) / max(1, total - warmup)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    recipe: Recipe, params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """SGD or AdamW, fused into one kernel over all parameters where torch has one for the
    device: the multi-tensor (foreach) default's arithmetic, to float round-off, in fewer
    launches."""
    optim = recipe.optim
    fused = device.type in ("cpu", "cuda")
    if optim.name == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)
    return torch.optim.SGD(
        params,
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        fused=fused,
    )


def batches_of_epoch(
    num_images: int, batch_size: int, seed: int, epoch: int, world_size: int = 1
) -> list[torch.Tensor]:
    """The epoch's shuffled global index batches, the same on every rank (a distributed sampler
    with per-epoch seeding: each rank takes its block of each batch).

    A short last batch is cut to a multiple of the world size, so the ranks' blocks are equal
    (gathers need equal shapes), and dropped if a rank's block would be under 2 images
    (BatchNorm cannot train on one image).
    """
    generator = torch.Generator().manual_seed(step_seed(seed, epoch, -1))
    order = torch.randperm(num_images, generator=generator)
    batches = list(order.split(batch_size))
    last = batches[-1][: len(batches[-1]) - len(batches[-1]) % world_size]
    return [*batches[:-1], last] if len(last) >= 2 * world_size else batches[:-1]


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation seed of one rank's block of a step: rank 0 keeps the step's seed, so a
    single-process run draws what it always drew."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % 2**63


@dataclass
class TrainState:
    """What a checkpoint holds besides the module and optimiser states."""

    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    step_in_epoch: int = 0  # steps of ``epoch`` already done
    global_step: int = 0
    images_seen: int = 0
    epoch_loss_sum: float = 0.0  # loss summed over the steps of ``epoch`` done so far
    wall_s: float = 0.0  # training time spent before this process
    resumed_from_step: int | None = None  # where the latest resume started, if any
    baselines: dict[str, float] = field(default_factory=dict)


def effective_settings(recipe: Recipe, num_train: int, num_test: int) -> dict[str, int]:
    """The sizes a run really uses, where the data set is smaller than the recipe asks: the
    images of each split, the images of a step, the keys held, the kNN neighbours."""
    batch = recipe.train.batch_size
    return {
        "num_train": num_train,
        "num_test": num_test,
        "batch_size": min(batch, num_train),
        "K": recipe.dictionary.K,
        "knn_k": min(recipe.eval.knn_k, num_train),
    }


def clipping_warnings(recipe: Recipe, effective: dict[str, int]) -> list[str]:
    """One line for each setting the data set clips (or, for K, makes repeat images)."""
    data, n = recipe.data, effective["num_train"]
    lines = []
    for key, asked, got in (
        ("data.num_train", data.num_train, n),
        ("data.num_test", data.num_test, effective["num_test"]),
    ):
        if asked > got:
            lines.append(f"{key} = {asked}, but {data.dataset} has {got} such images: using {got}")
    if recipe.train.batch_size > n:
        lines.append(
            f"train.batch_size = {recipe.train.batch_size} is above the {n} training images: "
            f"each step uses {n}"
        )
    if recipe.dictionary.kind in ("queue", "cross_batch") and n < recipe.dictionary.K:
        lines.append(
            f"dictionary.K = {recipe.dictionary.K} is above the {n} training images: the "
            "dictionary holds several keys of each image"
            + (
                " (a query's own are dropped: dictionary.exclude_own_keys)"
                if recipe.dictionary.exclude_own_keys
                else ", a query's own among its negatives (dictionary.exclude_own_keys = true "
                "drops them)"
            )
        )
    if recipe.eval.knn_k > n:
        lines.append(
            f"eval.knn_k = {recipe.eval.knn_k} is above the {n} training images: using {n}"
        )
    return [f"warning: {line}" for line in lines]


@dataclass
class Trainer(Resumable):
    recipe: Recipe
    run_dir: RunDir
    display: Display
    log: Callable[[dict[str, Any]], None]
    should_stop: Callable[[], bool] = lambda: False
    #: Called after each checkpoint is written, so the folder's state follows it.
    checkpointed: Callable[[TrainState], None] = lambda state: None

    def __post_init__(self) -> None:
        recipe = self.recipe
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.device = resolve_device(recipe.train.device)
        self.world_size, self.rank = dist.world_size(), dist.rank()
        if self.world_size > 1:
            check_world_size(recipe, self.world_size)
            if self.device.type == "cuda":  # init_from_env picked this rank's GPU
                self.device = torch.device("cuda", torch.cuda.current_device())
            check_sync_bn(recipe, self.world_size, self.device)
        check_compile(recipe, self.device)
        self.data: ImageSet = load_dataset(recipe.data)
        self.train_images = resident_images(self.data.train_x, self.device)
        channels = self.data.train_x.shape[1]
        self.augment = TwoViewAugment(
            recipe.augment, recipe.data.image_size, self.data.mean, self.data.std
        )
        torch.manual_seed(recipe.train.seed)
        self.method = build_method(
            recipe, channels, len(self.data.train_x), self.data.num_classes
        ).to(self.device)
        if recipe.train.channels_last:
            self.method.to(memory_format=torch.channels_last)
        # DDP averages the gradients over ranks; the method's forward is its training_loss.
        self.model: torch.nn.Module = self.method
        if self.world_size > 1:
            if recipe.model.sync_bn:
                self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.model = torch.nn.parallel.DistributedDataParallel(self.method)
        if recipe.train.compile:
            compile_encoders(self.method)
        trainable = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(recipe, trainable, self.device)
        self.steps_per_epoch = len(self.epoch_batches(0))
        self.total_steps = self.steps_per_epoch * recipe.train.epochs
        self.state = TrainState()
        self.effective = effective_settings(recipe, len(self.data.train_x), len(self.data.test_x))

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        recipe = self.recipe
        return batches_of_epoch(
            len(self.data.train_x),
            recipe.train.batch_size,
            recipe.train.seed,
            epoch,
            self.world_size,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    counters = TrainState
    unreadable_fix = "rerun with --force to start the run over"

    def save_checkpoint(self) -> None:
        """Rank 0 writes; the other ranks hold the same state."""
        if self.rank == 0:
            self.write_training_checkpoint()

    def checkpoint_file(self) -> Path:
        return self.run_dir.checkpoint

    def saved_parts(self) -> dict[str, Stateful]:
        return {"method": self.method, "optimizer": self.optimizer}

    def identity(self) -> dict[str, Any]:
        return {"fingerprint": self.recipe.fingerprint}

    # -- evaluation ----------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.data.mean, self.data.std)

    def knn(self, backbone: torch.nn.Module) -> float:
        features = [
            evaluate.extract_features(backbone, x, self.preprocess, self.device)
            for x in (self.data.train_x, self.data.test_x)
        ]
        return self._knn(features[0], features[1])

    def _knn(self, train_features: torch.Tensor, test_features: torch.Tensor) -> float:
        cfg = self.recipe.eval
        return evaluate.knn_top1(
            train_features,
            self.data.train_y,
            test_features,
            self.data.test_y,
            k=cfg.knn_k,
            T=cfg.knn_T,
            num_classes=self.data.num_classes,
        )

    def baselines(self) -> dict[str, float]:
        """kNN on raw pixels and on the randomly initialised encoder with re-estimated BN."""
        pixels = [self.preprocess(x).flatten(1) for x in (self.data.train_x, self.data.test_x)]
        random_backbone = self.method.backbone
        snapshot = {k: v.clone() for k, v in random_backbone.state_dict().items()}
        evaluate.reestimate_batchnorm(
            random_backbone, self.data.train_x, self.preprocess, self.device
        )
        random_knn = self.knn(random_backbone)
        random_backbone.load_state_dict(snapshot)
        return {"knn_top1_pixels": self._knn(*pixels), "knn_top1_random": random_knn}

    def final_metrics(self) -> dict[str, float]:
        backbone = self.method.backbone
        train_f, test_f = (
            evaluate.extract_features(backbone, x, self.preprocess, self.device)
            for x in (self.data.train_x, self.data.test_x)
        )
        metrics = {"knn_top1": self._knn(train_f, test_f)}
        if self.recipe.eval.linear:
            metrics["linear_top1"] = evaluate.linear_probe_top1(
                train_f,
                self.data.train_y,
                test_f,
                self.data.test_y,
                epochs=self.recipe.eval.linear_epochs,
                seed=self.recipe.train.seed,
            )
        return metrics

    # -- the loop ------------------------------------------------------------------------------

    def train_step(
        self,
        images: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        epoch: int,
        step: int,
    ) -> dict[str, torch.Tensor]:
        recipe = self.recipe
        seed = step_seed(recipe.train.seed, epoch, step)
        view_q, view_k = self.step_views(images, epoch, step)
        lr = learning_rate(recipe, self.state.global_step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        progress = Progress(epoch, self.state.global_step, self.total_steps, seed)
        with self.autocast():
            loss, logs = self.model(view_q, view_k, indices, labels, progress)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.end_step()
        return {"loss": loss.detach(), "lr": torch.tensor(lr), **logs}

    def batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 training images at ``indices``, gathered where they are kept."""
        return self.train_images[indices.to(self.train_images.device)]

    def step_views(
        self, images: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of this rank's uint8 ``images`` at (``epoch``, ``step``), drawn from the
        step's seed: what the step trains on, and what diagnostics rebuild when they replay it."""
        seed = rank_seed(step_seed(self.recipe.train.seed, epoch, step), self.rank)
        views = self.augment(
            images.to(self.device, non_blocking=True), torch.Generator().manual_seed(seed)
        )
        if self.recipe.train.channels_last:
            return tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
        return views

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast of the step's forward under ``train.precision = "bf16"``: matrix
        products and convolutions in bf16, reductions and losses in fp32 (torch's autocast
        lists), memories and parameters kept in fp32. No loss scaling: bf16 has fp32's range."""
        return torch.autocast(
            self.device.type, torch.bfloat16, enabled=self.recipe.train.precision == "bf16"
        )

    def elapsed(self) -> float:
        """Training wall time over all processes of this run, checkpoints included."""
        return self.wall_before + time.perf_counter() - self.started

    def checkpoint(self) -> None:
        self.state.wall_s = self.elapsed()
        self.state.epoch_loss_sum = float(self.epoch_loss)
        self.save_checkpoint()
        self.checkpointed(self.state)

    def run(self) -> dict[str, Any]:
        """Train to the end (resuming if a checkpoint exists) and return the final metrics."""
        recipe = self.recipe
        for line in clipping_warnings(recipe, self.effective):
            self.display.message(line)
        resumed = self.load_checkpoint()
        if resumed:
            self.run_dir.truncate_metrics(self.state.global_step)
            self.display.message(
                f"resuming from step {self.state.global_step} (epoch {self.state.epoch + 1})"
            )
        elif recipe.eval.baselines and self.rank == 0:
            with self.display.phase("computing baselines (random encoder, raw pixels)"):
                self.state.baselines = self.baselines()
        dist.barrier()  # evaluation runs once, on rank 0; the others wait here
        self.wall_before, self.started = self.state.wall_s, time.perf_counter()
        self.method.train()
        if recipe.train.compile:
            self.display.message("train.compile: the first steps compile the encoders (slower)")
        self.display.start(self.total_steps, self.state.global_step, self.state.epoch)
        for epoch in range(self.state.epoch, recipe.train.epochs):
            self.train_epoch(epoch)
        self.display.finish()
        wall_s = self.elapsed()
        metrics = {}
        if self.rank == 0:
            with self.display.phase("evaluating (kNN, linear probe)"):
                metrics = {**self.state.baselines, **self.final_metrics()}
        dist.barrier()
        self.log(
            {
                "kind": "eval",
                "epoch": recipe.train.epochs - 1,
                "global_step": self.state.global_step,
                **metrics,
            }
        )
        return {
            **metrics,
            "epochs_done": self.state.epoch,
            "global_step": self.state.global_step,
            "wall_s": wall_s,
            "imgs_per_s": self.state.images_seen / max(wall_s, 1e-9),
            "resumed_from_step": self.state.resumed_from_step,
            "device": str(self.device),
            "num_train": len(self.data.train_x),
            "num_test": len(self.data.test_x),
            "effective": self.effective,
        }

    def train_epoch(self, epoch: int) -> None:
        recipe, state = self.recipe, self.state
        batches = self.epoch_batches(epoch)
        # The running loss sum is kept in the checkpoint, so a resumed epoch logs the same mean.
        self.epoch_loss = torch.tensor(state.epoch_loss_sum, device=self.device)
        epoch_start, epoch_images = time.perf_counter(), 0
        if state.step_in_epoch == 0:  # a resume inside the epoch finds the hook's work done
            self.method.on_epoch_start(epoch, self)
        for step in range(state.step_in_epoch, len(batches)):
            indices = dist.own_rows(batches[step])  # this rank's block of the global batch
            labels = self.data.train_y[indices]
            logs = self.train_step(self.batch_images(indices), indices, labels, epoch, step)
            self.epoch_loss += logs["loss"]
            state.global_step += 1
            state.step_in_epoch = step + 1
            state.images_seen += len(batches[step])
            epoch_images += len(batches[step])
            if state.global_step % recipe.train.log_every_steps == 0:
                record = {k: float(v) for k, v in logs.items()}
                rate = epoch_images / (time.perf_counter() - epoch_start)
                record.update(
                    kind="step", epoch=epoch, global_step=state.global_step, imgs_per_s=rate
                )
                self.log(record)
                self.display.update(state.global_step, epoch, record)
            every = recipe.train.checkpoint_every_steps
            if every and state.global_step % every == 0:
                self.checkpoint()
            if dist.any_rank(self.should_stop()):
                self.checkpoint()
                raise StopRequested
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "global_step": state.global_step,
            "loss": float(self.epoch_loss) / len(batches),
        }
        if epoch_images:  # the rate of the steps this process ran; none after a resume at the
            # epoch's last step, where a rate of 0 would be a wrong measurement, not a slow one
            record["imgs_per_s"] = epoch_images / (time.perf_counter() - epoch_start)
        every_epochs = recipe.eval.every_epochs
        if every_epochs and (epoch + 1) % every_epochs == 0 and epoch + 1 < recipe.train.epochs:
            if self.rank == 0:
                record["knn_top1"] = self.knn(self.method.backbone)
                self.method.train()
            dist.barrier()
        self.log(record)
        self.display.epoch_end(epoch, recipe.train.epochs, record)
        every_diag = recipe.eval.diagnostics_every_epochs
        measure = every_diag and (epoch + 1) % every_diag == 0  # every rank: replays gather
        with self.autocast():  # replays run as the steps ran
            diag = diagnostics.measure(self) if measure else {}
        if diag:
            self.log({"kind": "diag", "epoch": epoch, "global_step": state.global_step, **diag})
        state.epoch, state.step_in_epoch = epoch + 1, 0
        self.epoch_loss.zero_()
        self.checkpoint()
        # A stop asked during the epoch's end (a pruner judging its kNN) stops here, not a step
        # into the next epoch; after the last one the run finishes.
        if epoch + 1 < recipe.train.epochs and dist.any_rank(self.should_stop()):
            raise StopRequested
