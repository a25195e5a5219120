"""Recipes: the typed, validated, fingerprinted description of one run.

A recipe is a TOML file whose tables mirror the slots of a contrastive method (key encoder,
dictionary, loss, hard-negative mixing) plus data, model, optimisation, training and evaluation.
Every key has a default, so a recipe only names what it changes. Loading merges the file onto the
defaults, applies ``--set KEY=VALUE`` overrides, and checks every key's name, type and range before
anything runs; the first problem becomes one :class:`~cltool.errors.RecipeError` line naming the
file, the key and the fix.

``m`` is, everywhere in this project, the weight kept on the *old* value (MoCo's m = 0.999).

This module imports no torch: ``cl sweep --dry-run`` and ``cl report`` stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cltool.errors import RecipeError

DATASETS = ("glyphs", "digits", "cifar10", "cifar100", "stl10", "imagefolder")
METHODS = ("moco", "mocov3", "simclr", "supcon", "instdisc", "xbm", "spcl")
#: What may follow pretraining, in the order a pipeline runs them (:mod:`cltool.stages`).
STAGE_KINDS = ("finetune", "linear", "supervised", "distill")


@dataclass(frozen=True)
class Bound:
    """An allowed numeric range; ``None`` leaves a side open."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value: float) -> bool:
        if self.low is not None and (
            value < self.low or (value == self.low and not self.low_inclusive)
        ):
            return False
        return not (
            self.high is not None
            and (value > self.high or (value == self.high and not self.high_inclusive))
        )

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left = "[" if self.low_inclusive else "("
            right = "]" if self.high_inclusive else ")"
            return f"in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None:
            return f"{'>=' if self.low_inclusive else '>'} {_fmt(self.low)}"
        if self.high is not None:
            return f"{'<=' if self.high_inclusive else '<'} {_fmt(self.high)}"
        return "any number"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


AT_LEAST_0 = Bound(0)
AT_LEAST_1 = Bound(1)
POSITIVE = Bound(0, low_inclusive=False)
PROBABILITY = Bound(0, 1)
MOMENTUM = Bound(0, 1, high_inclusive=False)


def knob(default: Any, bound: Bound | None = None, doc: str = "", shown: str | None = None) -> Any:
    """A recipe field with its default, its allowed range and a one-line description; ``shown``
    is what ``cl keys`` says the default is when the value alone would mislead."""
    metadata = {"bound": bound, "doc": doc, "shown": shown}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = knob("glyphs", doc=f"one of {', '.join(DATASETS)}")
    root: str = knob("data", doc="where downloaded data sets live")
    image_size: int = knob(24, Bound(8), "side of the square images fed to the encoder")
    num_train: int = knob(5000, AT_LEAST_0, "training images (0: all that the data set has)")
    num_test: int = knob(1000, AT_LEAST_0, "test images (0: all that the data set has)")
    download: bool = knob(True, doc="download torchvision data sets when missing")
    data_seed: int = knob(0, doc="seed of the generated data set and of subsampling")


@dataclass(frozen=True)
class AugmentConfig:
    crop_min_scale: float = knob(0.2, Bound(0, 1, low_inclusive=False), "random resized crop")
    crop_max_scale: float = knob(1.0, Bound(0, 1, low_inclusive=False), "random resized crop")
    rotate_degrees: float = knob(0.0, Bound(0, 180), "uniform rotation in [-d, d]")
    flip_p: float = knob(0.5, PROBABILITY, "horizontal flip probability")
    jitter_p: float = knob(0.8, PROBABILITY, "colour jitter probability")
    brightness: float = knob(0.4, AT_LEAST_0, "colour jitter strength")
    contrast: float = knob(0.4, AT_LEAST_0, "colour jitter strength")
    saturation: float = knob(0.4, AT_LEAST_0, "colour jitter strength")
    grayscale_p: float = knob(0.2, PROBABILITY, "random grayscale probability")
    blur_p: float = knob(0.5, PROBABILITY, "Gaussian blur probability")
    noise_std: float = knob(0.0, AT_LEAST_0, "additive Gaussian noise, in normalised units")


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["small_cnn", "resnet18", "resnet50"] = knob("small_cnn")
    width: int = knob(32, AT_LEAST_1, "channels of the first small_cnn stage")
    small_stem: bool = knob(True, doc="ResNet stem for small images (3x3 conv, no max-pool)")
    head: Literal["linear", "mlp"] = knob("mlp", doc="projection head (MoCo v1: linear)")
    head_hidden: int = knob(512, AT_LEAST_1, "hidden width of the MLP head")
    head_bn: bool = knob(True, doc="BatchNorm in the MLP head, centred output (as MoCo v3)")
    dim: int = knob(128, AT_LEAST_1, "embedding dimension")
    bn_splits: int = knob(1, AT_LEAST_1, "BatchNorm groups per batch (shuffle-BN on one device)")
    sync_bn: bool = knob(False, doc="SyncBatchNorm: BN statistics over all ranks (GPU runs)")
    head_layers: int = knob(2, Bound(2), "linear layers of the MLP head (SimCLR v2: 3)")
    eval_head_layers: int = knob(
        0, AT_LEAST_0, "hidden head layers kept on the backbone for evaluation (SimCLR v2: 1)"
    )
    predictor_hidden: int = knob(512, AT_LEAST_1, "hidden width of MoCo v3's predictor")
    encode_views: Literal["joint", "separate"] = knob(
        "joint",
        doc="joint: both views in one pass, BN over both (SimCLR); separate: a pass per view",
    )


@dataclass(frozen=True)
class KeyEncoderConfig:
    kind: Literal["momentum", "shared"] = knob("momentum")
    m: float = knob(0.99, MOMENTUM, "weight kept on the old key-encoder parameters")
    m_schedule: Literal["constant", "cosine"] = knob("constant", doc="cosine: from m up to 1")


@dataclass(frozen=True)
class DictionaryConfig:
    kind: Literal["queue", "in_batch", "memory_bank", "cross_batch", "hybrid"] = knob("queue")
    K: int = knob(4096, AT_LEAST_1, "number of keys held (queue / cross-batch memory size)")
    queue_start: Literal["empty", "random"] = knob(
        "empty",
        doc="queue: empty (the negatives are the keys enqueued so far) or random "
        "(K random unit vectors, as MoCo's code)",
    )
    bank_m: float = knob(
        0.5, MOMENTUM, "weight kept on old memory-bank / hybrid-memory entries (InstDisc 0.5)"
    )
    nce_k: int = knob(4096, AT_LEAST_1, "noise entries per image in InstDisc's NCE")
    warmup_steps: int = knob(0, AT_LEAST_0, "steps before the cross-batch memory joins the loss")
    exclude_own_keys: bool = knob(False, doc="drop a query's own stale keys from its negatives")


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["infonce", "nce", "contrastive", "triplet", "lifted", "circle"] = knob(
        "infonce", doc="nce: InstDisc's NCE; contrastive..circle: metric losses (XBM)"
    )
    T: float = knob(0.2, POSITIVE, "softmax temperature")
    base_T: float = knob(0.07, POSITIVE, "SupCon's base temperature (loss scale T / base_T)")
    margin: float = knob(0.5, AT_LEAST_0, "metric-loss margin; circle loss's relaxation m")
    mining: Literal["all", "hard", "semihard"] = knob("all", doc="triplets the loss uses")
    gamma: float = knob(80.0, POSITIVE, "circle loss scale")


@dataclass(frozen=True)
class MixingConfig:
    enabled: bool = knob(False, doc="MoCHi hard-negative mixing")
    N: int = knob(1024, AT_LEAST_1, "hardest negatives to mix from")
    s: int = knob(1024, AT_LEAST_0, "synthetic negatives mixing two hard negatives")
    s_prime: int = knob(256, AT_LEAST_0, "synthetic negatives mixing the query in")
    start_epoch: int = knob(0, AT_LEAST_0, "first epoch that mixes")


@dataclass(frozen=True)
class SpclConfig:
    distance: Literal["jaccard", "cosine"] = knob(
        "jaccard", doc="clustering distance: k-reciprocal Jaccard (the paper's) or cosine"
    )
    k1: int = knob(30, AT_LEAST_1, "k-reciprocal neighbourhood size of the Jaccard distance")
    k2: int = knob(6, AT_LEAST_1, "query-expansion neighbours of the Jaccard distance (1: none)")
    eps: float = knob(0.6, POSITIVE, "DBSCAN radius in the clustering distance")
    eps_delta: float = knob(0.02, Bound(0), "radius change of the reliability clusterings")
    min_samples: int = knob(4, AT_LEAST_1, "DBSCAN core-point neighbourhood size")
    reliability: bool = knob(True, doc="keep only independent and compact cluster members")
    reliability_quantile: float = knob(
        0.9, PROBABILITY, "quantile of the first epoch's criteria used as thresholds"
    )
    source_labelled: int = knob(
        0, AT_LEAST_0, "first N training images form a labelled source domain"
    )


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = knob("sgd")
    lr: float = knob(0.06, POSITIVE, "base learning rate")
    momentum: float = knob(0.9, MOMENTUM, "SGD momentum")
    weight_decay: float = knob(5e-4, AT_LEAST_0)
    schedule: Literal["cosine", "constant"] = knob("cosine", doc="learning-rate schedule")
    warmup_epochs: int = knob(0, AT_LEAST_0, "linear warm-up epochs")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = knob(30, AT_LEAST_1)
    batch_size: int = knob(256, Bound(2), "images per step")
    seed: int = knob(0, doc="seed of initialisation, data order and augmentation")
    device: str = knob("auto", doc="auto, cpu, cuda, cuda:N or mps")
    threads: int = knob(0, AT_LEAST_0, "CPU threads for torch (0: its default)")
    checkpoint_every_steps: int = knob(0, AT_LEAST_0, "0: at the end of every epoch only")
    log_every_steps: int = knob(10, AT_LEAST_1, "steps between metric lines")
    precision: Literal["fp32", "bf16"] = knob(
        "fp32", doc="bf16: encoder passes under bfloat16 autocast (losses, memories in fp32)"
    )
    channels_last: bool = knob(False, doc="NHWC memory format for encoders and views (GPUs)")
    compile: bool = knob(
        False, doc="torch.compile the encoders: slower first steps (compiling), faster later ones"
    )


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = knob(0, AT_LEAST_0, "kNN monitor period (0: only at the end)")
    knn_k: int = knob(200, AT_LEAST_1, "neighbours of the weighted kNN")
    knn_T: float = knob(0.1, POSITIVE, "temperature of the kNN vote weights")
    linear: bool = knob(True, doc="train a linear probe on frozen features at the end")
    linear_epochs: int = knob(100, AT_LEAST_1, "full-batch epochs of the linear probe")
    baselines: bool = knob(True, doc="also report kNN on raw pixels and on a random encoder")
    diagnostics_every_epochs: int = knob(
        0, AT_LEAST_0, "dictionary consistency and negative hardness period (0: never)"
    )


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = knob(False, doc="log the run to Weights & Biases")
    project: str = knob("cltool", doc="W&B project")
    entity: str = knob("", doc="W&B entity (empty: your default)")
    tags: list[str] = knob([], doc="extra W&B tags")
    mode: Literal["auto", "online", "offline"] = knob(
        "auto", doc="auto: online when an API key and network are there, else offline"
    )


@dataclass(frozen=True)
class StagesConfig:
    run: list[str] = knob(
        [],
        doc="stages after pretraining, any of finetune, linear, supervised, distill "
        "(cl run and cl sweep run them once the run is done; cl eval on a finished run)",
    )
    fractions: list[float] = knob(
        [0.01, 0.1], doc="label fractions in (0, 1] of finetune, linear and supervised"
    )
    subset_seed: int = knob(
        0, doc="seed of the class-balanced labelled subsets: the same images for every run"
    )


@dataclass(frozen=True)
class StageOptimConfig:
    """The budget of a stage: fine-tuning, the linear probe and supervised-from-scratch share
    the ``[finetune]`` one, so that they compare at the same budget."""

    epochs: int = knob(100, AT_LEAST_1, "passes over the stage's training images")
    batch_size: int = knob(64, Bound(2), "images per step")
    optimizer: Literal["sgd", "adamw"] = knob("sgd")
    lr: float = knob(0.05, POSITIVE, "learning rate, cosine-decayed to 0")
    momentum: float = knob(0.9, MOMENTUM, "SGD momentum")
    weight_decay: float = knob(5e-4, AT_LEAST_0)
    seed: int = knob(
        0,
        doc="added to the run's train.seed: the seed of the stage's initialisation, data order "
        "and augmentation (a sweep's seeds give its stages distinct seeds too)",
    )


@dataclass(frozen=True)
class FinetuneConfig(StageOptimConfig):
    start_layer: int = knob(
        -1,
        Bound(-1),
        "where the classifier goes: 0 after the backbone, i after head layer i "
        "(SimCLR v2: 1), -1 as the parent's model.eval_head_layers",
    )
    augment: bool = knob(
        True, doc="the parent's crop, rotation and flip on each labelled image (no colour)"
    )


@dataclass(frozen=True)
class DistillConfig(StageOptimConfig):
    epochs: int = knob(30, AT_LEAST_1, "passes over all training images")
    batch_size: int = knob(256, Bound(2), "images per step")
    lr: float = knob(0.1, POSITIVE, "learning rate, cosine-decayed to 0")
    fraction: float = knob(
        0.1, Bound(0, 1, low_inclusive=False), "the teacher: the finetune stage on this fraction"
    )
    T: float = knob(1.0, POSITIVE, "temperature of the teacher's and student's softmax")
    backbone: Literal["same", "small_cnn", "resnet18", "resnet50"] = knob(
        "same", doc="the student's backbone (same: the teacher's)"
    )
    width: int = knob(0, AT_LEAST_0, "the student's small_cnn width (0: the teacher's)")
    labels: bool = knob(
        False, doc="also cross-entropy on the labelled images of each batch (SimCLR v2 eq. 3)"
    )


@dataclass(frozen=True)
class Recipe:
    name: str = knob(
        "run",
        doc="recipe name; run folders live under runs/<name>/",
        shown="the recipe file's name without .toml",
    )
    method: str = knob("moco", doc=f"one of {', '.join(METHODS)}")
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    key_encoder: KeyEncoderConfig = field(default_factory=KeyEncoderConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    spcl: SpclConfig = field(default_factory=SpclConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def fingerprint(self) -> str:
        """Short hash of the canonical resolved recipe: the run id.

        The name and the W&B settings are left out: the same settings under two names, or
        logged to two projects, are one run. So are the stage tables: they say what follows
        the run, and each stage has its own id (:mod:`cltool.stages`).
        """
        left_out = NOT_FINGERPRINTED | STAGE_TABLES
        canonical = {k: v for k, v in self.to_dict().items() if k not in left_out}
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


#: Keys that change where results go, not what they are.
NOT_FINGERPRINTED = frozenset({"name", "wandb"})
#: Tables that describe the stages after pretraining, not the pretraining run itself.
STAGE_TABLES = frozenset({"stages", "finetune", "distill"})

#: Short names accepted by ``--set`` and ``cl sweep --param``.
SHORT_NAMES: dict[str, str] = {
    "K": "dictionary.K",
    "m": "key_encoder.m",
    "T": "loss.T",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "lr": "optim.lr",
}


def short_key(key: str) -> str:
    """The short name of a dotted key where it has one (tables, hints), else the key."""
    return next((short for short, full in SHORT_NAMES.items() if full == key), key)


#: Extra checks on a key's value beyond its type and range.
CHOICES: dict[str, tuple[str, ...]] = {"data.dataset": DATASETS, "method": METHODS}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type = Recipe, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of the schema, mapped to its dataclass field."""
    keys: dict[str, dataclasses.Field] = {}
    hints = _section_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(all_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = f
    return keys


def _field_type(dotted: str) -> Any:
    cls: type = Recipe
    *sections, leaf = dotted.split(".")
    for section in sections:
        cls = _section_types(cls)[section]
    return _section_types(cls)[leaf]


def expects_number(dotted: str) -> bool:
    """Whether a key takes an int or a float (so a stray string is a typo, not a value)."""
    return _field_type(dotted) in (int, float)


def expects_integer(dotted: str) -> bool:
    """Whether a key takes whole numbers (a search's range over it is then an integer range)."""
    return _field_type(dotted) is int


def canonical_key(key: str, source: str) -> str:
    """Resolve a short name or dotted key, or fail with the closest valid key."""
    key = SHORT_NAMES.get(key, key)
    valid = all_keys()
    if key not in valid:
        raise RecipeError(f"{source}: unknown key '{key}'{_suggest(key, valid)}")
    return key


#: Words users reach for, mapped to the key that means it here.
SYNONYMS: dict[str, str] = {
    "temperature": "loss.T",
    "tau": "loss.T",
    "queue_size": "dictionary.K",
    "momentum": "key_encoder.m",
    "learning_rate": "optim.lr",
    "batchsize": "train.batch_size",
}


def _close_short_name(key: str) -> str | None:
    """The short name a dot-less key was probably meant to be: ``t`` -> ``T``, ``epoch`` ->
    ``epochs``. Short names are too short for the dotted-key matching to find them."""
    if "." in key:
        return None
    by_case = {short.lower(): short for short in SHORT_NAMES}
    close = difflib.get_close_matches(key, list(SHORT_NAMES), n=1, cutoff=0.7)
    return by_case.get(key.lower()) or (close[0] if close else None)


def _suggest(key: str, valid: dict[str, Any]) -> str:
    section, _, leaf = key.rpartition(".")
    same_section = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
    if synonym := difflib.get_close_matches(leaf.lower(), list(SYNONYMS), n=1, cutoff=0.8):
        best = SYNONYMS[synonym[0]]
    elif short := _close_short_name(key):
        return f" (did you mean '{short}', short for '{SHORT_NAMES[short]}'?)"
    elif close := difflib.get_close_matches(leaf, same_section, n=1, cutoff=0.5):
        best = f"{section}.{close[0]}" if section else close[0]
    elif close := difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6):
        best = close[0]
    else:
        return " (`cl keys` lists every key)"
    return f" (did you mean '{best}'?)"


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal; a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(assignment: str, source: str = "--set") -> tuple[str, Any]:
    """Split ``KEY=VALUE`` into a canonical dotted key and a parsed value."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"{source} {assignment!r}: expected KEY=VALUE, e.g. --set m=0.99")
    return canonical_key(key.strip(), f"{source} {assignment}"), parse_value(text.strip())


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a one-line RecipeError."""
    if path.is_dir():
        found = sorted(path.glob("*.toml")) or sorted(path.rglob("*.toml"))
        hint = (
            f"give one of its .toml files, e.g. {', '.join(str(p) for p in found[:3])}"
            if found
            else "it holds no .toml file"
        )
        raise RecipeError(f"{path}: is a folder, not a recipe file: {hint}")
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (check the path)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: malformed TOML: {err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"T": 0.2}}`` -> ``{"loss.T": 0.2}``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _coerce(dotted: str, value: Any, source: str) -> Any:
    """Check a value against its key's type, choices and range; return it normalised."""
    annotation = _field_type(dotted)
    spec = all_keys()[dotted]
    where = f"{source}: {dotted} = {_show(value)}"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise RecipeError(f"{where} is not allowed: choose one of {', '.join(allowed)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be a whole number")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise RecipeError(f"{where} must be a number")
        value = float(value)
    elif annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string (quote it in TOML)")
        choices = CHOICES.get(dotted)
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{where} is unknown{hint}: choose one of {', '.join(choices)}")
        if dotted == "train.device" and not DEVICE_PATTERN.match(value):
            raise RecipeError(f"{where} is not a device: use auto, cpu, cuda, cuda:N or mps")
    elif origin in (list, types.GenericAlias) and not isinstance(value, list):
        raise RecipeError(f"{where} must be a list")
    bound: Bound | None = spec.metadata.get("bound")
    if bound is not None and not bound.contains(value):
        raise RecipeError(f"{where} is out of range: must be {bound.describe()}")
    return value


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    hints = _section_types(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], flat, f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" in flat:
            kwargs[f.name] = flat[f"{prefix}{f.name}"]
    return cls(**kwargs)


#: Tables a recipe file may hold that are not part of the run itself (used by other commands).
LAUNCH_TABLES = frozenset({"sweep", "slurm"})


def resolve(
    table: dict[str, Any],
    overrides: list[tuple[str, Any]] | None = None,
    source: str = "recipe",
    default_name: str = "run",
    override_sources: Mapping[str, str] | None = None,
) -> Recipe:
    """Validate a recipe table plus canonical overrides and build the frozen Recipe.

    An error in an override names the flag it came from: ``override_sources`` maps a key to its
    flag (``--param m=0.9,0.99``); an override not in it came from ``--set``.
    """
    flat: dict[str, Any] = {}
    for key, value in flatten({k: v for k, v in table.items() if k not in LAUNCH_TABLES}).items():
        if key in SHORT_NAMES:
            raise RecipeError(
                f"{source}: '{key}' is a command-line short name; in a file write "
                f"'{SHORT_NAMES[key]}'"
            )
        key = canonical_key(key, source)
        flat[key] = _coerce(key, value, source)
    flags = {key: (override_sources or {}).get(key, "--set") for key, _ in overrides or []}
    for key, value in overrides or []:
        flat[key] = _coerce(key, value, flags[key])
    flat.setdefault("name", default_name)
    recipe = _build(Recipe, flat)
    _check_consistency(recipe, source, flags)
    return recipe


def _check_consistency(recipe: Recipe, source: str, flags: Mapping[str, str]) -> None:
    """Checks that involve more than one key. ``flags`` maps the keys given on the command line
    to their flag: a clash is blamed on the flag that set one of its keys, else on the file."""

    def blame(*keys: str) -> str:
        return next((flags[key] for key in keys if key in flags), source)

    aug = recipe.augment
    if aug.crop_min_scale > aug.crop_max_scale:
        raise RecipeError(
            f"{blame('augment.crop_min_scale', 'augment.crop_max_scale')}: "
            f"augment.crop_min_scale = {aug.crop_min_scale} exceeds "
            f"augment.crop_max_scale = {aug.crop_max_scale}: make min <= max"
        )
    if recipe.mixing.enabled and recipe.dictionary.kind == "in_batch":
        raise RecipeError(
            f"{blame('mixing.enabled', 'dictionary.kind')}: mixing.enabled = true needs a "
            'dictionary with stored negatives: set dictionary.kind = "queue"'
        )
    if recipe.mixing.enabled and recipe.method != "moco":
        raise RecipeError(
            f"{blame('mixing.enabled', 'method')}: "
            'mixing.enabled = true is implemented for method = "moco" only'
        )
    flat = flatten(recipe.to_dict())
    for key, allowed in METHOD_SLOTS[recipe.method].items():
        if flat[key] in allowed:
            continue
        choices = " or ".join(f'"{a}"' for a in allowed)
        clash = f'method = "{recipe.method}" needs {key} = {choices}, not "{flat[key]}"'
        if key in flags:
            raise RecipeError(f"{flags[key]}: {clash}: give {key} one of those there")
        if "method" in flags:
            raise RecipeError(
                f"{flags['method']}: {clash} (from {source}): also give --set {key}={allowed[0]}"
            )
        raise RecipeError(f"{source}: {clash}: set it in the recipe")
    model = recipe.model
    if model.head_layers > 2 and model.head != "mlp":
        raise RecipeError(
            f"{blame('model.head_layers', 'model.head')}: "
            'model.head_layers > 2 needs model.head = "mlp"'
        )
    if model.eval_head_layers > model.head_layers - 2:
        raise RecipeError(
            f"{blame('model.eval_head_layers', 'model.head_layers')}: "
            f"model.eval_head_layers = {model.eval_head_layers} keeps more than the "
            f"{model.head_layers - 2} hidden head layers that precede the final MLP: raise "
            "model.head_layers or lower model.eval_head_layers"
        )
    _check_stages(recipe, blame)
    spcl = recipe.spcl
    if spcl.distance == "jaccard" and spcl.eps + spcl.eps_delta >= 1:
        raise RecipeError(
            f"{blame('spcl.eps', 'spcl.eps_delta', 'spcl.distance')}: spcl.eps = {spcl.eps} "
            f"(+ eps_delta {spcl.eps_delta}) reaches 1, the "
            "Jaccard distance of images that share no neighbour, so DBSCAN would join them all: "
            "keep spcl.eps + spcl.eps_delta below 1 (the paper: 0.6)"
        )


def _check_stages(recipe: Recipe, blame: Callable[..., str]) -> None:
    """The list-valued stage keys, item by item (the type check sees only a list)."""
    for kind in recipe.stages.run:
        if kind not in STAGE_KINDS:
            close = difflib.get_close_matches(str(kind), STAGE_KINDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(
                f"{blame('stages.run')}: stages.run holds {_show(kind)}, not a stage{hint}: "
                f"choose from {', '.join(STAGE_KINDS)}"
            )
    for fraction in recipe.stages.fractions:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise RecipeError(
                f"{blame('stages.fractions')}: stages.fractions holds {_show(fraction)}: "
                "write numbers in (0, 1], e.g. [0.01, 0.1]"
            )
        if not 0 < fraction <= 1:
            raise RecipeError(
                f"{blame('stages.fractions')}: stages.fractions holds {fraction}, outside "
                "(0, 1]: a label fraction is a share of the training images, e.g. 0.01 for 1%"
            )


def check_world_size(recipe: Recipe, world_size: int) -> None:
    """The global batch ``train.batch_size`` is split evenly over the ranks."""
    if recipe.train.batch_size % world_size:
        raise RecipeError(
            f"train.batch_size = {recipe.train.batch_size} is not divisible by the world size "
            f"{world_size}: choose a multiple of {world_size}"
        )


METRIC_LOSSES = ("contrastive", "triplet", "lifted", "circle")

#: The slot values each method is built from; anything else is a recipe error, not ignored.
METHOD_SLOTS: dict[str, dict[str, tuple[str, ...]]] = {
    "moco": {"dictionary.kind": ("queue", "in_batch"), "loss.kind": ("infonce",)},
    "mocov3": {
        "key_encoder.kind": ("momentum",),
        "dictionary.kind": ("in_batch",),
        "loss.kind": ("infonce",),
    },
    "simclr": {
        "key_encoder.kind": ("shared",),
        "dictionary.kind": ("in_batch",),
        "loss.kind": ("infonce",),
    },
    "supcon": {
        "key_encoder.kind": ("shared",),
        "dictionary.kind": ("in_batch",),
        "loss.kind": ("infonce",),
    },
    "instdisc": {
        "key_encoder.kind": ("shared",),
        "dictionary.kind": ("memory_bank",),
        "loss.kind": ("infonce", "nce"),
    },
    "xbm": {"dictionary.kind": ("cross_batch",), "loss.kind": METRIC_LOSSES},
    "spcl": {
        "key_encoder.kind": ("shared",),
        "dictionary.kind": ("hybrid",),
        "loss.kind": ("infonce",),
    },
}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file: the single entry point for ``cl run``."""
    path = Path(path)
    table = read_toml(path)
    parsed = [parse_assignment(item) for item in overrides or []]
    return resolve(table, parsed, source=str(path), default_name=path.stem)


def to_toml(recipe: Recipe) -> str:
    """Write the resolved recipe as TOML (every key, so the file alone reproduces the run)."""
    lines: list[str] = []
    nested: list[tuple[str, dict[str, Any]]] = []
    for key, value in recipe.to_dict().items():
        if isinstance(value, dict):
            nested.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for section, values in nested:
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key: the source of ``cl keys``."""
    defaults = flatten(Recipe().to_dict())
    short = {v: k for k, v in SHORT_NAMES.items()}
    rows = []
    for key, f in all_keys().items():
        doc = f.metadata.get("doc", "")
        annotation = _field_type(key)
        if typing.get_origin(annotation) is Literal:
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(typing.get_args(annotation))
        bound = f.metadata.get("bound")
        if bound is not None:
            doc = (doc + "; " if doc else "") + bound.describe()
        if key in short:
            doc = f"(short: {short[key]}) " + doc
        rows.append((key, f.metadata.get("shown") or _toml_value(defaults[key]), doc))
    return rows
