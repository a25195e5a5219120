"""Step time of every method against the fastest plain step of the same encoder passes.

For each recipe under ``recipes/*.toml`` (and each method ``build_method`` knows that no recipe
file covers), moved to the issue's setting (ResNet-18 with the CIFAR stem, 32x32, MLP head
512-2048-128, SGD), this times, interleaved round by round so machine load hits all alike:

- ``floor``: the encoder passes the method's step makes (recorded with forward hooks on one
  real step), replayed on ready float tensors with nothing else: forward, ``sum().backward()``
  of the grad passes, one SGD step. For MoCo that is one forward+backward of the query encoder
  and one no-grad forward of the key encoder. The optimiser is whichever SGD implementation is
  fastest here (for-loop, foreach or fused), so the floor is the leanest step this script can
  write; methods with the same passes share one floor measurement.
- ``step``: ``Trainer.train_step`` of this project on a uint8 batch, augmentation included,
  as ``cl run`` calls it (with the batch gather from the in-memory data set).
- ``step_noaug``: the same ``train_step`` with the augmentation replaced by ready views.
- ``lightly``: the same step written with lightly's building blocks (MoCo v2: its projection
  head, ``update_momentum`` and ``NTXentLoss`` with a memory bank; SimCLR: ``NTXentLoss``), on
  ready views like ``step_noaug``, when ``lightly`` is installed.

Medians are printed as ratios to the floor measured in the same run, then a per-phase breakdown
of one instrumented step per method (augment, query/key forward, loss, backward, optimiser,
momentum update, memory update, rest), timed by wrapping those calls.

    .venv/bin/python benchmarks/step_bench.py                       # the issue's setting
    .venv/bin/python benchmarks/step_bench.py --methods moco simclr --repeats 5 --batch 256
    .venv/bin/python benchmarks/step_bench.py --backbone small_cnn --batch 8 --repeats 1

Timings on a shared machine are noisy: compare ratios from one run, never absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cltool.train as train_module
from cltool.data import ImageSet
from cltool.errors import CLToolError
from cltool.nets import Encoder, build_backbone
from cltool.recipe import METHODS, Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
Step = Callable[[], Any]


# --------------------------------------------------------------------------------------------
# setting and recipes


@dataclass(frozen=True)
class Setting:
    """The shape of the benchmark: what every recipe is moved to before it is timed."""

    backbone: str = "resnet18"
    batch: int = 128
    image_size: int = 32
    small_stem: bool = True  # the CIFAR stem; ImageNet's (stride-2 conv, max-pool) when False
    head_hidden: int = 2048
    dim: int = 128
    device: str = "cpu"
    num_train: int = 50_000  # sizes memory banks like CIFAR-10
    num_classes: int = 10
    extra: tuple[str, ...] = ()  # the command line's --set items, applied last

    def overrides(self) -> list[str]:
        """``--set`` items that put a recipe in this setting, leaving its method slots alone."""
        return [
            f"model.backbone={self.backbone}",
            f"model.small_stem={str(self.small_stem).lower()}",
            "model.head=mlp",
            f"model.head_hidden={self.head_hidden}",
            f"model.dim={self.dim}",
            f"data.image_size={self.image_size}",
            f"data.num_train={self.num_train}",
            f"train.batch_size={self.batch}",
            f"train.device={self.device}",
            "optim.name=sgd",
            "mixing.start_epoch=0",
            *self.extra,
        ]


def small_stem(image_size: int) -> bool:
    """The CIFAR stem for small images; above 64 px ImageNet's, whose stride-2 conv and max-pool
    cut activations 16-fold (the CIFAR stem on a 224 px ResNet-50 at batch 128 does not fit in
    an H200's 140 GB: ``benchmarks/gpu.sh``'s first run showed it)."""
    return image_size <= 64


def method_slot_overrides(method: str) -> list[str]:
    """The first allowed value of each slot ``method`` constrains, so a synthesised recipe for
    a method without a recipe file passes validation."""
    slots = getattr(importlib.import_module("cltool.recipe"), "METHOD_SLOTS", {})
    return [f"{key}={allowed[0]}" for key, allowed in slots.get(method, {}).items()]


def discover(
    setting: Setting, wanted: list[str] | None, all_recipes: bool
) -> tuple[list[Recipe], list[str]]:
    """Recipes to time (``recipes/*.toml`` first, then one per uncovered method) and skip notes.

    ``wanted`` picks by recipe file stem or method name; without it, every recipe file
    (``all_recipes``) or one per method.
    """
    recipes, notes = [], []
    files = sorted((ROOT / "recipes").glob("*.toml"))
    for path in files:
        try:
            recipes.append(load_recipe(path, setting.overrides()))
        except CLToolError as err:
            notes.append(f"{path.name}: not loadable in this setting ({err})")
    covered = {r.method for r in recipes}
    for method in METHODS:
        if method in covered or not files:
            continue
        extra = [f"method={method}", f"name={method}", *method_slot_overrides(method)]
        try:
            recipes.append(load_recipe(files[0], [*setting.overrides(), *extra]))
        except CLToolError as err:
            notes.append(f"{method}: no recipe file and no valid default ({err})")
    if wanted:  # a recipe stem picks that file; a method name, every file of the method
        names = {r.name for r in recipes}
        methods = {w for w in wanted if w not in names}
        return [r for r in recipes if r.name in wanted or r.method in methods], notes
    if not all_recipes:
        recipes = one_per_method(recipes)
    return recipes, notes


def one_per_method(recipes: list[Recipe]) -> list[Recipe]:
    """The recipe named after each method (else its first file): the quick default run."""
    chosen: dict[str, Recipe] = {}
    for recipe in recipes:
        if recipe.method not in chosen or recipe.name == recipe.method:
            chosen[recipe.method] = recipe
    return [r for r in recipes if chosen[r.method] is r]


def synthetic_data(setting: Setting, seed: int = 0) -> ImageSet:
    """Random uint8 images in memory: the step does not care what the pixels show."""
    g = torch.Generator().manual_seed(seed)
    shape = (setting.num_train, 3, setting.image_size, setting.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    labels = torch.randint(0, setting.num_classes, (setting.num_train,), generator=g)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    return ImageSet("synthetic", images, labels, images[:0], labels[:0], 10, mean, std)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name`` for the duration of the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def build_trainer(recipe: Recipe, data: ImageSet) -> train_module.Trainer:
    """The real :class:`Trainer` on synthetic data; no run folder, display or log is touched
    by ``train_step``. ``build_method`` is called with as many of (recipe, channels, num_train,
    num_classes) as its signature takes, so the script runs on either side of that change."""
    real_build = train_module.build_method
    arity = len(inspect.signature(real_build).parameters)

    def build(recipe: Recipe, channels: int, *_: Any) -> nn.Module:
        args = (recipe, channels, len(data.train_x), data.num_classes)
        return real_build(*args[:arity])

    no_data = patched(train_module, "load_dataset", lambda cfg: data)
    with no_data, patched(train_module, "build_method", build):
        trainer = train_module.Trainer(recipe, None, None, lambda record: None)  # type: ignore[arg-type]
    trainer.method.train()
    return trainer


# --------------------------------------------------------------------------------------------
# the project's step


@dataclass
class Batches:
    """Draws index batches the way an epoch does, and counts steps for distinct seeds."""

    data: ImageSet
    batch: int
    step: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))

    def next(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        self.step += 1
        n = len(self.data.train_x)
        indices = torch.randperm(n, generator=self.generator)[: self.batch]
        return indices, self.data.train_y[indices], self.step


def project_step(trainer: train_module.Trainer, batches: Batches) -> Step:
    """One ``Trainer.train_step`` as ``train_epoch`` makes it (gather where the trainer keeps
    the images, step, loss sum)."""
    loss_sum = torch.zeros((), device=trainer.device)

    def step() -> None:
        indices, y, i = batches.next()
        logs = trainer.train_step(trainer.batch_images(indices), indices, y, 0, i)
        loss_sum.add_(logs["loss"])

    return step


class ReadyViews:
    """Stands in for ``TwoViewAugment``: hands back views made once, so a step without
    augmentation is still the trainer's own ``train_step``."""

    def __init__(self, trainer: train_module.Trainer, images: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(2)
        views = trainer.augment(images.to(trainer.device), generator)
        self.views = tuple(v.contiguous() for v in views)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        return self.views


def project_step_noaug(trainer: train_module.Trainer, batches: Batches) -> Step:
    """``train_step`` with the augmentation swapped for :class:`ReadyViews` during the call."""
    ready = ReadyViews(trainer, batches.data.train_x[: batches.batch])
    inner = project_step(trainer, batches)

    def step() -> None:
        real, trainer.augment = trainer.augment, ready
        try:
            inner()
        finally:
            trainer.augment = real

    return step


# --------------------------------------------------------------------------------------------
# the floor


@dataclass(frozen=True)
class Pass:
    """One encoder call of a step: which encoder, the input shape, whether it builds a graph."""

    encoder: str
    shape: tuple[int, ...]
    grad: bool


def encoders_of(method: nn.Module) -> dict[str, Encoder]:
    """Every :class:`Encoder` of a method, by module path, outermost only."""
    found: dict[str, Encoder] = {}
    for name, module in method.named_modules():
        if isinstance(module, Encoder) and not any(name.startswith(f"{p}.") for p in found):
            found[name] = module
    return found


def record_passes(trainer: train_module.Trainer, step: Step) -> tuple[Pass, ...]:
    """The encoder passes one real step makes, from forward hooks."""
    passes: list[Pass] = []
    handles = []
    for name, encoder in encoders_of(trainer.method).items():

        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            passes.append(Pass(name, tuple(args[0].shape), torch.is_grad_enabled()))

        handles.append(encoder.register_forward_pre_hook(hook))
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return tuple(passes)


def fastest_sgd_kind(params: list[nn.Parameter], recipe: Recipe, rounds: int = 3) -> str:
    """``"for-loop"``, ``"foreach"`` or ``"fused"``: whichever SGD step is quickest here."""
    for p in params:
        p.grad = torch.zeros_like(p)
    times: dict[str, list[float]] = {}
    optimizers = {kind: make_sgd(params, recipe, kind) for kind in ("for-loop", "foreach", "fused")}
    optimizers = {k: v for k, v in optimizers.items() if v is not None}
    sync = synchronizer(params[0].device)
    for _ in range(rounds + 1):
        for kind, optimizer in optimizers.items():
            times.setdefault(kind, []).append(timed(optimizer.step, sync))
    for p in params:
        p.grad = None
    return min(times, key=lambda k: statistics.median(times[k][1:]))


def make_sgd(params: list[nn.Parameter], recipe: Recipe, kind: str) -> torch.optim.SGD | None:
    """The recipe's SGD with a chosen implementation; None where this torch lacks it."""
    optim = recipe.optim
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    try:
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            **flags[kind],
        )
    except (RuntimeError, TypeError, ValueError):
        return None


@dataclass
class Floor:
    """The leanest step of given encoder passes: forward(s), one backward, one SGD step."""

    passes: tuple[Pass, ...]
    encoders: dict[str, nn.Module]
    inputs: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    sgd_kind: str

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for p, x in zip(self.passes, self.inputs, strict=True):
            encoder = self.encoders[p.encoder]
            if p.grad:
                out = encoder(x).sum()
                total = out if total is None else total + out
            else:
                with torch.no_grad():
                    encoder(x)
        if total is not None:
            total.backward()
            self.optimizer.step()


def build_floor(trainer: train_module.Trainer, passes: tuple[Pass, ...]) -> Floor:
    """Fresh copies of the method's encoders, fed ready float inputs of the recorded shapes."""
    originals = encoders_of(trainer.method)
    encoders = {
        name: copy.deepcopy(originals[name]).train() for name in {p.encoder for p in passes}
    }
    for name, encoder in encoders.items():
        encoder.requires_grad_(any(p.grad for p in passes if p.encoder == name))
        if trainer.recipe.train.compile:  # a copy must not call into the original's compiled code
            encoder.compile()
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(p.shape, generator=g).to(trainer.device) for p in passes]
    params = [p for e in encoders.values() for p in e.parameters() if p.requires_grad]
    kind = fastest_sgd_kind(params, trainer.recipe)
    return Floor(passes, encoders, inputs, make_sgd(params, trainer.recipe, kind), kind)


def pass_signature(passes: tuple[Pass, ...]) -> str:
    """A readable key for a pass pattern: 'q:128+ k:128' (a trailing + marks a grad pass)."""
    return " ".join(
        f"{p.encoder.rsplit('_', 1)[-1]}:{p.shape[0]}{'+' if p.grad else ''}" for p in passes
    )


# --------------------------------------------------------------------------------------------
# lightly's equivalent steps


def lightly_available() -> bool:
    try:
        import lightly  # noqa: F401
    except Exception:  # not installed, or broken against this torch
        return False
    return True


def lightly_moco(recipe: Recipe, views: tuple[torch.Tensor, torch.Tensor]) -> Step:
    """lightly's MoCo v2 training step (its docs' example) on ready views."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    model = recipe.model
    backbone, features = build_backbone(model, 3)
    head = MoCoProjectionHead(features, model.head_hidden, model.dim, batch_norm=model.head_bn)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(
        temperature=recipe.loss.T, memory_bank_size=(recipe.dictionary.K, model.dim)
    )
    modules = nn.ModuleList([backbone, head, backbone_m, head_m, criterion]).to(views[0].device)
    modules.train()
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = make_sgd(params, recipe, "for-loop")
    m = recipe.key_encoder.m

    def step() -> None:
        update_momentum(backbone, backbone_m, m)
        update_momentum(head, head_m, m)
        query = head(backbone(views[0]))
        key = head_m(backbone_m(views[1])).detach()
        loss = criterion(query, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def lightly_simclr(recipe: Recipe, views: tuple[torch.Tensor, torch.Tensor]) -> Step:
    """lightly's SimCLR training step (its docs' example: two forward calls) on ready views."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    model = recipe.model
    backbone, features = build_backbone(model, 3)
    head = SimCLRProjectionHead(features, model.head_hidden, model.dim, batch_norm=model.head_bn)
    criterion = NTXentLoss(temperature=recipe.loss.T)
    modules = nn.ModuleList([backbone, head]).to(views[0].device).train()
    optimizer = make_sgd(list(modules.parameters()), recipe, "for-loop")

    def step() -> None:
        loss = criterion(head(backbone(views[0])), head(backbone(views[1])))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


#: Methods with a lightly counterpart, keyed by (method, dictionary kind).
LIGHTLY_STEPS: dict[
    tuple[str, str], Callable[[Recipe, tuple[torch.Tensor, torch.Tensor]], Step]
] = {
    ("moco", "queue"): lightly_moco,
    ("simclr", "in_batch"): lightly_simclr,
}


# --------------------------------------------------------------------------------------------
# timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work (a no-op on the CPU), so a wall clock covers the work."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def timed(step: Step, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def interleaved(
    steps: dict[str, Step], repeats: int, sync: Callable[[], None], warmup: int = 0
) -> dict[str, list[float]]:
    """``repeats`` rounds, each timing every step once in turn, after ``warmup`` untimed
    rounds: slow phases of a shared machine then fall on all steps alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            seconds = timed(step, sync)
            if round_ >= warmup:
                times[name].append(seconds)
        print(f"  round {round_ + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    return times


# --------------------------------------------------------------------------------------------
# per-phase breakdown


class PhaseClock:
    """Exclusive wall time per phase: time spent in a nested phase (an encoder forward inside
    the method's loss) counts for the inner phase only. Each phase is also a
    ``record_function`` range, so a ``--trace`` shows them in the torch profiler."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.open: list[tuple[str, float, list[float], Any]] = []  # name, start, child s, range

    def start(self, name: str) -> None:
        self.sync()
        scope = torch.profiler.record_function(name)
        scope.__enter__()
        self.open.append((name, time.perf_counter(), [0.0], scope))

    def end(self) -> None:
        self.sync()
        name, start, child, scope = self.open.pop()
        scope.__exit__(None, None, None)
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - child[0]
        if self.open:
            self.open[-1][2][0] += elapsed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.end()

        return wrapped


MOMENTUM_FUNCTIONS = ("update_momentum_encoder", "momentum_update")


@contextlib.contextmanager
def instrumented(trainer: train_module.Trainer, clock: PhaseClock) -> Iterator[None]:
    """Wrap the step's parts in clock phases for the duration of the block.

    Encoder forwards are split by grad mode (query vs key forward); the momentum update is
    found by name in every ``cltool.methods`` module; backward runs from the end of
    ``zero_grad`` to the optimiser step, as ``train_step`` orders them.
    """
    method, optimizer = trainer.method, trainer.optimizer
    zero_grad, optimizer_step = optimizer.zero_grad, optimizer.step

    def zero_grad_then_backward(*args: Any, **kwargs: Any) -> None:
        zero_grad(*args, **kwargs)
        clock.start("backward")

    def end_backward_then_step(*args: Any, **kwargs: Any) -> Any:
        clock.end()
        return clock.wrap("optimizer", optimizer_step)(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(trainer, "augment", clock.wrap("augment", trainer.augment)))
        stack.enter_context(
            patched(method, "training_loss", clock.wrap("loss", method.training_loss))
        )
        stack.enter_context(
            patched(method, "end_step", clock.wrap("memory update", method.end_step))
        )
        stack.enter_context(patched(optimizer, "zero_grad", zero_grad_then_backward))
        stack.enter_context(patched(optimizer, "step", end_backward_then_step))
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("cltool.methods"):
                for fn_name in MOMENTUM_FUNCTIONS:
                    if hasattr(module, fn_name):
                        fn = clock.wrap("momentum update", getattr(module, fn_name))
                        stack.enter_context(patched(module, fn_name, fn))
        for encoder in encoders_of(method).values():
            stack.enter_context(forward_clock(encoder, clock))
        yield


@contextlib.contextmanager
def forward_clock(encoder: nn.Module, clock: PhaseClock) -> Iterator[None]:
    """Time every forward of ``encoder`` as 'query forward' (grad) or 'key forward' (no grad)."""

    def before(module: nn.Module, args: Any) -> None:
        clock.start("query forward" if torch.is_grad_enabled() else "key forward")

    def after(module: nn.Module, args: Any, out: Any) -> None:
        clock.end()

    handles = [encoder.register_forward_pre_hook(before), encoder.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def breakdown(
    trainer: train_module.Trainer, step: Step, sync: Callable[[], None], trace: Path | None
) -> dict[str, float]:
    """Seconds per phase of one instrumented step; 'loss' is the method's own work outside the
    encoders and the momentum update, 'rest' the trainer's bookkeeping around them."""
    clock = PhaseClock(sync)
    profiler = torch.profiler.profile() if trace else contextlib.nullcontext()
    with instrumented(trainer, clock), profiler as prof:
        total = timed(step, sync)
    if trace:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    seconds = dict(clock.seconds)
    seconds["rest"] = total - sum(seconds.values())
    seconds["total"] = total
    return seconds


PHASES = (
    "augment",
    "query forward",
    "key forward",
    "momentum update",
    "loss",
    "backward",
    "optimizer",
    "memory update",
    "rest",
)


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class MethodResult:
    name: str
    method: str
    floor: str
    steps: dict[str, str] = field(default_factory=dict)  # variant -> key into the times
    phases: dict[str, float] = field(default_factory=dict)


def prepare(
    recipe: Recipe, data: ImageSet, setting: Setting, floors: dict[str, Floor], with_lightly: bool
) -> tuple[MethodResult, dict[str, Step], train_module.Trainer]:
    """Build the trainer, its step variants and (if new) the floor of its pass pattern."""
    trainer = build_trainer(recipe, data)
    batches = Batches(data, setting.batch)
    full = project_step(trainer, batches)
    passes = record_passes(trainer, full)
    signature = pass_signature(passes)
    if signature not in floors:
        floors[signature] = build_floor(trainer, passes)
        floors[signature]()  # warm-up: the timed rounds have none
    result = MethodResult(recipe.name, recipe.method, signature)
    steps = {
        f"{recipe.name}/step": full,
        f"{recipe.name}/step_noaug": project_step_noaug(trainer, batches),
    }
    key = (recipe.method, recipe.dictionary.kind)
    if with_lightly and key in LIGHTLY_STEPS:
        views = ReadyViews(trainer, data.train_x[: setting.batch]).views
        steps[f"{recipe.name}/lightly"] = LIGHTLY_STEPS[key](recipe, views)
        steps[f"{recipe.name}/lightly"]()  # warm-up
    result.steps = {name.split("/", 1)[1]: name for name in steps}
    return result, steps, trainer


def ratio_table(
    results: list[MethodResult], floors: dict[str, Floor], med: dict[str, float]
) -> str:
    variants = ("step", "step_noaug", "lightly")
    lines = [
        "| recipe | method | floor passes | floor s | "
        + " | ".join(f"{v} / floor" for v in variants)
        + " |",
        "|---|---|---|---|" + "---|" * len(variants),
    ]
    for r in results:
        floor = med[f"floor[{r.floor}]"]
        cells = [f"{med[r.steps[v]] / floor:.3f}x" if v in r.steps else "-" for v in variants]
        lines.append(
            f"| {r.name} | {r.method} | {r.floor} | {floor:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def phase_table(results: list[MethodResult]) -> str:
    lines = [
        "| recipe | " + " | ".join(PHASES) + " | total s |",
        "|---|" + "---|" * (len(PHASES) + 1),
    ]
    for r in results:
        total = r.phases.get("total", 0.0)
        cells = [f"{100 * r.phases.get(p, 0.0) / total:.1f}%" for p in PHASES]
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {total:.3f} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace, setting: Setting) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg(),
        "device": setting.device,
        "repeats": args.repeats,
        "setting": vars(setting),
    }


def add_setting_arguments(parser: argparse.ArgumentParser, batch: int, num_train: int) -> None:
    """The arguments that shape a step benchmark (read back by :func:`setting_from`)."""
    parser.add_argument(
        "--backbone", default="resnet18", choices=("small_cnn", "resnet18", "resnet50")
    )
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-train", type=int, default=num_train, help="synthetic data set size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


def setting_from(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> Setting:
    """The :class:`Setting` of :func:`add_setting_arguments`' arguments; sets torch's threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return Setting(
        backbone=args.backbone,
        batch=args.batch,
        image_size=args.image_size,
        small_stem=small_stem(args.image_size),
        device=args.device,
        num_train=max(args.num_train, args.batch),
        extra=extra,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setting_arguments(parser, batch=128, num_train=50_000)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds")
    parser.add_argument("--methods", nargs="*", help="recipe stems or method names (default: all)")
    parser.add_argument(
        "--all-recipes", action="store_true", help="every recipe file, not one per method"
    )
    parser.add_argument("--no-lightly", action="store_true", help="skip lightly's steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every method (e.g. model.encode_views=separate, "
        "train.compile=true: the floor's encoders are then compiled too)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trace", type=Path, help="folder for profiler traces of the breakdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setting = setting_from(args, extra=tuple(args.set))
    env = environment(args, setting)
    recipes, notes = discover(setting, args.methods, args.all_recipes)
    with_lightly = not args.no_lightly and lightly_available()
    if not with_lightly:
        notes.append("lightly: not installed (pip install lightly) or skipped; no lightly column")
    data = synthetic_data(setting)
    sync = synchronizer(torch.device(setting.device))
    floors: dict[str, Floor] = {}
    results, steps, trainers = [], {}, []
    for recipe in recipes:
        try:
            result, method_steps, trainer = prepare(recipe, data, setting, floors, with_lightly)
        except Exception as err:  # a method mid-development must not stop the others
            notes.append(f"{recipe.name}: cannot be built here ({err.__class__.__name__}: {err})")
            continue
        results.append(result)
        steps.update(method_steps)
        trainers.append((trainer, method_steps[result.steps["step"]]))
    for signature, floor in floors.items():
        steps[f"floor[{signature}]"] = floor
    print(f"timing {len(steps)} steps x {args.repeats} rounds", file=sys.stderr)
    times = interleaved(steps, args.repeats, sync)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for result, (trainer, step) in zip(results, trainers, strict=True):
        trace = args.trace / f"{result.name}.json" if args.trace else None
        result.phases = breakdown(trainer, step, sync, trace)
    env["load_avg_end"] = os.getloadavg()
    env["floor_sgd"] = {sig: f.sgd_kind for sig, f in floors.items()}
    report(args, env, notes, results, floors, med, times)
    return 0


def report(
    args: argparse.Namespace,
    env: dict[str, Any],
    notes: list[str],
    results: list[MethodResult],
    floors: dict[str, Floor],
    med: dict[str, float],
    times: dict[str, list[float]],
) -> None:
    print(
        f"## step: {env['setting']['backbone']}, batch {env['setting']['batch']}, "
        f"{env['setting']['image_size']}px, {env['device']}, torch {env['torch']}, "
        f"{env['threads']} threads, {args.repeats} rounds, load {env['load_avg_start'][0]:.1f}"
        + "".join(f", {item}" for item in args.set)
    )
    print()
    print("Median step time as a ratio to the floor of the same encoder passes (same run).")
    print(f"Floor SGD implementation (fastest here): {env['floor_sgd']}")
    print()
    print(ratio_table(results, floors, med))
    print()
    print("Share of one instrumented step per phase:")
    print()
    print(phase_table(results))
    for note in notes:
        print(f"\nnote: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "environment": env,
            "notes": notes,
            "median_s": med,
            "times_s": times,
            "methods": [vars(r) for r in results],
        }
        args.json.write_text(json.dumps(blob, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
