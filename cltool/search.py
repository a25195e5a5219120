"""Searches: a sweep whose points come from an Optuna study instead of a product of dimensions.

On the command line (``cl sweep RECIPE --search tpe|random --trials N ...``), each ``--param``
is one dimension of the search space (:mod:`cltool.search_space`: ranges, log ranges, choices).
The same lives in the recipe's ``[sweep]`` table (``search``, ``trials``, ``objective``,
``direction``, ``pruner``; ``param`` values as lists or range strings); flags replace it.

The study is kept in Optuna's journal file storage in the sweep folder, ``OUT/sweeps/<id>/study/``:
every change is one appended line, so a kill loses nothing, re-running the same command continues
the study, and workers on several nodes of a shared file system share it. The sweep id covers
the base recipe, the space, the sampler, the objective and its direction and the pruner, not
``--trials``: asking for more trials extends the same study.

Every trial is an ordinary run (resolved recipe, run id, run folder, resume, W&B) listed in the
sweep's manifest as a grid's runs are, with its trial numbers, so ``cl status`` and ``cl report``
read it as they read any sweep. The workers that ask, train and tell are in
:mod:`cltool.search_worker`. Optuna is imported only by the functions that need the study, so
``cl --help`` and ``cl sweep --dry-run`` stay fast; this module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cltool.cli_common import choose
from cltool.errors import InputError, RecipeError
from cltool.recipe import (
    Recipe,
    read_toml,
    resolve,
    short_key,
    to_toml,
)
from cltool.search_space import SearchParam, describe_params, file_space, parse_search_param
from cltool.sweep import (
    MANIFEST,
    SEED_KEY,
    Dimension,
    parse_sweep_table,
    parse_zip,
    sweep_folder,
)
from cltool.track import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("tpe", "random")
PRUNERS = ("halving", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
#: The metric the kNN monitor writes into epoch records: the only one with intermediate values.
MONITOR = "knn_top1"
DEFAULT_OBJECTIVE = MONITOR
STUDY = "study"
JOURNAL = "journal.log"
BASE = "base.toml"


# -- the compiled search -----------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSettings:
    """How the study searches: sampler, trial budget, what it optimises and how it prunes."""

    sampler: str
    trials: int
    objective: str = DEFAULT_OBJECTIVE
    direction: str = "maximize"
    #: Hyperband by default: on a shortened default it let more trials train longer and beat the
    #: grid, where successive halving stopped 7 and 9 of 10 trials after 2 epochs and only tied it
    #: (benchmarks/results/search_vs_grid_reduced.md).
    pruner: str = "hyperband"

    def as_json(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "trials": self.trials,
            "objective": self.objective,
            "direction": self.direction,
            "pruner": self.pruner,
        }


@dataclass(frozen=True)
class Search:
    """A validated search: its base recipe, space and settings, and where it lives."""

    sweep_id: str
    source: Path
    base: Recipe
    space: tuple[SearchParam, ...]
    settings: SearchSettings
    slurm: dict[str, Any]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.space)

    def folder(self, out: Path) -> Path:
        return sweep_folder(out, self.sweep_id)


def produced_metrics(recipe: Recipe) -> set[str]:
    """The numbers a finished run of ``recipe`` writes into its summary (see ``Trainer.run``)."""
    metrics = {"knn_top1", "wall_s", "imgs_per_s"}
    if recipe.eval.linear:
        metrics.add("linear_top1")
    if recipe.eval.baselines:
        metrics |= {"knn_top1_random", "knn_top1_pixels"}
    return metrics


def settings_from(table: Mapping[str, Any], flags: Mapping[str, Any], where: str) -> SearchSettings:
    """Flags (None when not given) over the ``[sweep]`` table's search keys of file ``where``;
    an error names the flag, or the file and key, that gave the bad value."""

    def pick(name: str, default: Any) -> tuple[Any, str]:
        value = flags.get(name)
        if value is not None:
            return value, f"--{name}"
        return table.get(name, default), f"{where}: sweep.{name} ="

    def one_of(name: str, default: Any, allowed: tuple[str, ...]) -> str:
        value, source = pick(name, default)
        return choose(value, allowed, source)

    sampler = one_of("search", None, SAMPLERS)
    trials, source = pick("trials", None)
    if trials is None:
        raise InputError(f"--search {sampler}: give the number of trials, e.g. --trials 20")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise InputError(f"{source} {trials}: needs at least 1 trial, e.g. --trials 20")
    direction = one_of("direction", "maximize", DIRECTIONS)
    pruner = one_of("pruner", SearchSettings.pruner, PRUNERS)
    objective = str(pick("objective", DEFAULT_OBJECTIVE)[0])
    return SearchSettings(sampler, trials, objective, direction, pruner)


def _check_no_grid(space: Sequence[SearchParam], grid: Sequence[Dimension]) -> None:
    """A key searched and gridded is refused by name; other grid dimensions are refused too
    (a trial is one run, so a search has no product to take)."""
    searched = {p.key: p for p in space}
    for dim in grid:
        for key in dim.keys:
            if key in searched:
                raise RecipeError(
                    f"{searched[key].source}: '{short_key(key)}' is searched and also in the grid "
                    f"dimension {dim.source}: search it or grid it, not both"
                )
    if grid:
        raise RecipeError(
            f"{grid[0].source}: a search runs one run per trial and takes no grid dimension "
            "(--zip, --seeds): drop it, or run a grid sweep without --search"
        )


def compile_search(
    path: Path,
    *,
    flags: Mapping[str, Any],
    params: Sequence[str] = (),
    zips: Sequence[str] = (),
    seeds: int | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> Search:
    """Validate a search and everything its trials can be; writes nothing.

    Each range's ends and each choice are resolved as a run's recipe would be, so a bound the key
    does not allow (``m=0.9..1``) fails here, naming its ``--param``.
    """
    path = Path(path)
    table = read_toml(path)
    sweep_table = table.get("sweep", {})
    if not isinstance(sweep_table, dict):
        raise RecipeError(f"{path}: [sweep] must be a table")
    parse_sweep_table({k: v for k, v in sweep_table.items() if k != "param"}, str(path))
    settings = settings_from(sweep_table, flags, str(path))
    flag_space = [parse_search_param(p) for p in params]
    flag_keys = {p.key for p in flag_space}
    space = [p for p in file_space(sweep_table, str(path)) if p.key not in flag_keys]
    space += flag_space
    seen: set[str] = set()
    for param in space:
        if param.key in seen:
            raise RecipeError(f"{param.source}: '{short_key(param.key)}' is searched twice")
        seen.add(param.key)
    if not space:
        raise InputError(
            "--search: give the space, e.g. --param lr=1e-3..1e-1:log --param T=0.05..0.5"
        )
    grid = [parse_zip(z) for z in zips] + parse_sweep_table(
        {"zip": sweep_table.get("zip", [])}, str(path)
    )[0]
    seed_count = seeds if seeds is not None else sweep_table.get("seeds")
    if seed_count is not None:
        grid.append(Dimension((SEED_KEY,), (), f"--seeds {seed_count}"))
    _check_no_grid(space, grid)
    base = resolve(table, list(overrides), source=str(path), default_name=path.stem)
    for param in space:
        values = param.choices or (param.low, param.high)
        for value in values:
            resolve(
                table,
                [*overrides, (param.key, value)],
                source=str(path),
                default_name=path.stem,
                override_sources={param.key: param.source},
            )
    produced = produced_metrics(base)
    if settings.objective not in produced:
        raise InputError(
            f"--objective {settings.objective}: no run of this search produces it; choose one "
            f"of {', '.join(sorted(produced))} (linear_top1 needs eval.linear = true)"
        )
    definition = {
        "name": base.name,
        "base_fingerprint": base.fingerprint,
        "space": [p.as_json() for p in space],
        "search": {k: v for k, v in settings.as_json().items() if k != "trials"},
    }
    blob = json.dumps(definition, sort_keys=True, default=str)
    slurm = table.get("slurm", {})
    if not isinstance(slurm, dict):
        raise RecipeError(f"{path}: [slurm] must be a table")
    return Search(
        sweep_id=hashlib.sha256(blob.encode()).hexdigest()[:10],
        source=path,
        base=base,
        space=tuple(space),
        settings=settings,
        slurm=slurm,
    )


def monitor_note(search: Search) -> str | None:
    """Why no trial can be pruned, when that is so (the pruner needs the kNN monitor)."""
    if search.settings.pruner == "none":
        return None
    if search.settings.objective != MONITOR:
        return (
            f"--pruner {search.settings.pruner}: only the {MONITOR} objective has values "
            "during training (the kNN monitor), so no trial is pruned"
        )
    if not search.base.eval.every_epochs:
        return (
            f"--pruner {search.settings.pruner}: eval.every_epochs is 0, so no trial reports "
            "intermediate values and none is pruned; set e.g. --set eval.every_epochs=1"
        )
    return None


# -- the sweep folder --------------------------------------------------------------------------


def write_search(search: Search, out: Path) -> Path:
    """Create (or refresh) the sweep folder: base recipe, search definition, an empty or kept
    run list. The study itself is created by the first worker."""
    folder = search.folder(out)
    atomic_write_text(folder / BASE, to_toml(search.base))
    previous = read_json(folder / MANIFEST) or {}
    manifest = {
        "version": 1,
        "sweep_id": search.sweep_id,
        "created_at": previous.get("created_at", time.time()),
        "definition": {"source": str(search.source), "name": search.base.name},
        "swept_keys": list(search.keys),
        "search": {**search.settings.as_json(), "space": [p.as_json() for p in search.space]},
        "runs": previous.get("runs", []),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


@dataclass(frozen=True)
class SearchSpec:
    """A search as its workers read it back from the sweep folder."""

    folder: Path
    base_table: dict[str, Any]
    space: tuple[SearchParam, ...]
    settings: SearchSettings

    @classmethod
    def load(cls, folder: Path) -> SearchSpec:
        folder = Path(folder)
        manifest = read_json(folder / MANIFEST) or {}
        search = manifest.get("search")
        if not isinstance(search, dict):
            raise InputError(f"{folder}: not a search's sweep folder (its manifest has no search)")
        settings = SearchSettings(**{k: search[k] for k in SearchSettings.__dataclass_fields__})
        space = tuple(SearchParam.from_json(p) for p in search["space"])
        return cls(folder, read_toml(folder / BASE), space, settings)

    @property
    def out(self) -> Path:
        return self.folder.resolve().parent.parent

    def recipe(self, params: Mapping[str, Any]) -> Recipe:
        """A trial's resolved recipe: the base with the trial's values."""
        return resolve(self.base_table, list(params.items()), source=str(self.folder / BASE))

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {p.key: p.distribution() for p in self.space}


def is_search(folder: Path) -> bool:
    manifest = read_json(Path(folder) / MANIFEST) or {}
    return isinstance(manifest.get("search"), dict)


# -- the study ---------------------------------------------------------------------------------


def _sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    """TPE starts from random trials: a quarter of the budget (Optuna's 10 at most), so that a
    small budget is still mostly guided. ``constant_liar`` keeps parallel workers from asking
    for the same point while earlier trials run."""
    import optuna

    if settings.sampler == "random":
        return optuna.samplers.RandomSampler()
    startup = min(10, max(2, math.ceil(settings.trials / 4)))
    return optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True)


def _pruner(settings: SearchSettings, base: Recipe) -> optuna.pruners.BasePruner:
    """Resources are epochs: the monitor reports at epoch ``every_epochs``, ``2 every_epochs``
    and so on (its value for epoch e at step e)."""
    import optuna

    first = max(1, base.eval.every_epochs)
    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=first, max_resource=max(first, base.train.epochs)
        )
    return optuna.pruners.NopPruner()


def journal_storage(folder: Path) -> optuna.storages.BaseStorage:
    """Optuna's journal file storage in ``<sweep folder>/study/`` (every write an appended line
    under a lock file that works on network file systems)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    study_dir = Path(folder) / STUDY
    study_dir.mkdir(parents=True, exist_ok=True)
    path = str(study_dir / JOURNAL)
    return optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path)))


def open_study(spec: SearchSpec) -> optuna.Study:
    """The search's study, created by the first worker that asks."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = spec.recipe({})
    return optuna.create_study(
        study_name=spec.folder.name,
        storage=journal_storage(spec.folder),
        sampler=_sampler(spec.settings),
        pruner=_pruner(spec.settings, base),
        direction=spec.settings.direction,
        load_if_exists=True,
    )


def load_study(folder: Path) -> optuna.Study | None:
    """The study in ``folder``, read without creating anything (None before any worker)."""
    import optuna

    if not (Path(folder) / STUDY / JOURNAL).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=Path(folder).name, storage=journal_storage(folder))
    except KeyError:  # the journal holds no study yet
        return None


def read_trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials ([] when no worker started yet)."""
    study = load_study(folder)
    return [] if study is None else study.get_trials(deepcopy=False)


# -- reading a search back ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    """One trial as ``cl status`` and ``cl report`` show it."""

    number: int
    state: str  # Optuna's: complete, pruned, fail, running, waiting
    params: dict[str, Any]
    value: float | None  # the final value, or the last intermediate one so far
    run_id: str | None
    steps: dict[int, float]  # intermediate values by epochs trained


def trial_rows(folder: Path) -> list[TrialRow]:
    """Every trial of the study in ``folder``, by number."""
    rows = []
    for trial in read_trials(folder):
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        rows.append(
            TrialRow(
                number=trial.number,
                state=trial.state.name.lower(),
                params=dict(trial.params),
                value=value,
                run_id=trial.user_attrs.get("run_id"),
                steps=dict(trial.intermediate_values),
            )
        )
    return sorted(rows, key=lambda r: r.number)


def best_rows(rows: Sequence[TrialRow], direction: str, count: int) -> list[TrialRow]:
    """The ``count`` best finished trials (complete ones; pruned ones only rank below them)."""
    done = [r for r in rows if r.state == "complete" and r.value is not None]
    return sorted(done, key=lambda r: r.value if direction == "minimize" else -r.value)[:count]


def trials_to_come(folder: Path) -> bool:
    """Whether the search in ``folder`` has fewer finished trials than its budget."""
    budget = (read_json(Path(folder) / MANIFEST) or {}).get("search", {}).get("trials", 0)
    return sum(t.state.is_finished() for t in read_trials(folder)) < budget


def summary_line(folder: Path) -> str:
    """``N trials: a complete, b pruned, ...; best trial k: objective v (params)``."""
    manifest = read_json(Path(folder) / MANIFEST) or {}
    settings = manifest.get("search", {})
    rows = trial_rows(folder)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    text = f"{len(rows)} of {settings.get('trials')} trials: " + ", ".join(
        f"{n} {state}" for state, n in sorted(counts.items())
    )
    best = best_rows(rows, settings.get("direction", "maximize"), 1)
    if best:
        objective = settings.get("objective")
        text += f"; best trial {best[0].number}: {objective} {best[0].value:.4f}"
        text += f" ({describe_params(best[0].params)})"
    return text


def status_columns(folder: Path, rows: Sequence[TrialRow]) -> dict[str, dict[str, str]]:
    """``cl status``'s extra columns for a search: each run's trial numbers and the objective
    so far (its latest trial's final value, else its last intermediate one)."""
    objective = (read_json(Path(folder) / MANIFEST) or {}).get("search", {}).get("objective")
    trials: dict[str, list[str]] = {}
    values: dict[str, str] = {}
    for row in rows:
        if row.run_id is None:
            continue
        trials.setdefault(row.run_id, []).append(str(row.number))
        if row.value is not None:
            values[row.run_id] = f"{row.value:.4g}"
    return {"trial": {k: ",".join(v) for k, v in trials.items()}, str(objective): values}
