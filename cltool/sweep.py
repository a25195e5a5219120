"""Sweeps: a base recipe and a grid of swept values, compiled into validated, deduplicated runs.

On the command line (``cl sweep RECIPE ...``)::

    --param KEY=V1,V2,...        one dimension; each value is a TOML literal (a bare word is a
                                 string); KEY is dotted or a short name (K, m, T, lr, ...)
    --param KEY=A..B:lin:N       N evenly spaced values from A to B, both included
    --param KEY=A..B:log:N       N values evenly spaced in log space from A to B, both included
    --param KEY=A..B:xF          A, A*F, A*F^2, ... up to B (F > 1)
    --zip K1,K2=a1:b1,a2:b2      one dimension whose keys move together: (a1, b1), (a2, b2)
    --seeds N                    one dimension: train.seed = the base seed + 0, 1, ..., N-1

Ranges and literal values can be mixed in one ``--param`` (``lr=0.5,1e-3..1e-1:log:3``). The runs
are the cartesian product of all dimensions.

The same sweep can live in the recipe file, so that a sweep is a file that is committed and
rerun; its ``[sweep]`` table is ignored by ``cl run``::

    [sweep]
    seeds = 3
    param = { m = [0.9, 0.99], "optim.lr" = "1e-3..1e-1:log:3" }   # a list, or a range string
    zip = [ { K = [1024, 4096], T = [0.1, 0.2] } ]                  # a list of linked groups

A flag naming a key that the file also sweeps replaces the file's dimension for that key, and
``--seeds`` replaces ``seeds``. A key may be swept by only one dimension.

Every expanded run goes through :func:`cltool.recipe.resolve`, exactly as ``cl run --set`` would,
before anything is written: one bad value rejects the whole sweep with that one-line error. Runs
are identified by their recipe fingerprint, so runs that resolve to the same recipe are one run.

The sweep id is a short hash of its definition (recipe name, base fingerprint, dimensions). The
sweep folder ``OUT/sweeps/<sweep id>/`` holds ``manifest.json`` (the definition, the swept keys
and, per run, its id, folder, swept values and every submission) and ``recipes/<run id>.toml``,
the resolved recipe that a SLURM task or a subprocess loads. This module imports no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltool.errors import InputError, RecipeError
from cltool.recipe import (
    STAGE_TABLES,
    Recipe,
    canonical_key,
    expects_number,
    flatten,
    parse_value,
    read_toml,
    resolve,
    short_key,
    to_toml,
)
from cltool.stages import STAGES, plan_stages
from cltool.track import RunDir, atomic_write_json, atomic_write_text, read_json

SWEEPS = "sweeps"
MANIFEST = "manifest.json"
RECIPES = "recipes"
SEED_KEY = "train.seed"
#: The ``[sweep]`` keys of a search (read by :mod:`cltool.search`, which the same table's
#: ``param`` then feeds with distributions).
SEARCH_KEYS = ("search", "trials", "objective", "direction", "pruner")
#: More runs than this is almost certainly a typo in a range (``x1.0001``), not a plan.
MAX_RUNS = 10_000

_RANGE = re.compile(r"^(?P<a>[^:]+?)\.\.(?P<b>[^:]+):(?:(?P<mode>lin|log):(?P<n>\d+)|x(?P<f>.+))$")


@dataclass(frozen=True)
class Dimension:
    """Keys that vary together and the tuples of values they take, one tuple per point."""

    keys: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]
    #: Where it was given (``--param m=0.9,0.99``), named by an error in one of its values; not
    #: part of the sweep's identity.
    source: str = field(default="", compare=False)

    def as_json(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "values": [list(p) for p in self.points]}


@dataclass(frozen=True)
class PlannedRun:
    """One expanded run: its resolved recipe and the values the sweep gave it."""

    recipe: Recipe
    params: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.recipe.fingerprint

    def run_dir(self, out: Path) -> RunDir:
        return RunDir.for_run(out, self.recipe.name, self.run_id)


@dataclass(frozen=True)
class Sweep:
    """A compiled sweep: validated runs plus what is needed to launch and re-find them."""

    sweep_id: str
    source: Path
    definition: dict[str, Any]
    swept_keys: tuple[str, ...]
    runs: tuple[PlannedRun, ...]
    slurm: dict[str, Any]

    def folder(self, out: Path) -> Path:
        return sweep_folder(out, self.sweep_id)


def sweep_folder(out: Path, sweep_id: str) -> Path:
    return Path(out) / SWEEPS / sweep_id


# -- parsing values ---------------------------------------------------------------------------


def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside quotes and brackets, so TOML lists and strings stay whole."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def _number(text: str, where: str) -> int | float:
    value = parse_value(text)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecipeError(f"{where}: '{text}' is not a number")
    return value


def _tidy(value: float, integral: bool) -> int | float:
    """Round away float noise (0.1 * 3) and keep whole numbers whole when the ends were."""
    value = float(f"{value:.12g}")
    return round(value) if integral and value.is_integer() else value


def expand_range(text: str, where: str) -> list[Any] | None:
    """The values of ``A..B:lin:N``, ``A..B:log:N`` or ``A..B:xF``; None when not a range."""
    match = _RANGE.match(text.strip())
    if match is None:
        return None
    a, b = _number(match["a"], where), _number(match["b"], where)
    integral = isinstance(a, int) and isinstance(b, int)
    if match["f"] is not None:
        factor = _number(match["f"], where)
        if factor <= 1 or a <= 0 or b < a:
            raise RecipeError(f"{where}: '{text}' needs 0 < A <= B and a factor > 1")
        values, x = [], a
        while x <= b * (1 + 1e-9) and len(values) <= MAX_RUNS:
            values.append(_tidy(x, integral and isinstance(factor, int)))
            x *= factor
        return values
    n = int(match["n"])
    if n < 1 or n > MAX_RUNS:
        raise RecipeError(f"{where}: '{text}' needs between 1 and {MAX_RUNS} values")
    if n == 1:
        return [a]
    if match["mode"] == "log":
        if a <= 0 or b <= 0:
            raise RecipeError(f"{where}: '{text}': a log range needs positive ends")
        points = [
            math.exp(math.log(a) + i * (math.log(b) - math.log(a)) / (n - 1)) for i in range(n)
        ]
    else:
        points = [a + i * (b - a) / (n - 1) for i in range(n)]
    tidy = [_tidy(x, integral=False) for x in points]
    return [_tidy(x, integral) for x in tidy] if all(x.is_integer() for x in tidy) else tidy


def _values(key: str, items: list[Any], where: str) -> list[Any]:
    """Expand range strings among parsed values; literal values pass through."""
    values: list[Any] = []
    for item in items:
        expanded = _expand(key, item, where) if isinstance(item, str) else None
        values.extend([item] if expanded is None else expanded)
    return values


def _expand(key: str, text: str, where: str) -> list[Any] | None:
    """A range's values, None for a literal; a number key's value that has ``..`` but is no
    range is refused here, with the range forms (the type check would only say "a number")."""
    expanded = expand_range(text, where)
    if expanded is None and ".." in text and expects_number(key):
        raise RecipeError(
            f"{where}: '{text}' is neither a number nor a range: a range is A..B:lin:N, "
            f"A..B:log:N or A..B:xF, e.g. {short_key(key)}=0.1..0.5:lin:5"
        )
    return expanded


def split_param(text: str, usage: str) -> tuple[str, str, str]:
    """``KEY=VALUES`` of one ``--param``: the key (short names made full), the values' text and
    the flag as messages name it; ``usage`` is shown when the shape is wrong."""
    where = f"--param {text}"
    key, sep, rest = text.partition("=")
    if not sep or not key.strip() or not rest.strip():
        raise RecipeError(f"{where}: expected {usage}")
    return canonical_key(key.strip(), where), rest, where


def parse_param(text: str) -> Dimension:
    """``KEY=V1,V2,...`` (values or ranges) as one dimension."""
    key, rest, where = split_param(text, "KEY=V1,V2,... e.g. --param m=0.9,0.99")
    values: list[Any] = []
    for item in split_top(rest, ","):
        if not item:
            raise RecipeError(f"{where}: empty value in the list")
        expanded = _expand(key, item, where)
        values.extend([parse_value(item)] if expanded is None else expanded)
    return Dimension((key,), tuple((v,) for v in values), where)


def parse_zip(text: str) -> Dimension:
    """``K1,K2=a1:b1,a2:b2`` as one dimension of linked values."""
    where = f"--zip {text}"
    keys_text, sep, rest = text.partition("=")
    if not sep or not rest.strip():
        raise RecipeError(f"{where}: expected K1,K2=a1:b1,a2:b2")
    keys = tuple(canonical_key(k.strip(), where) for k in split_top(keys_text, ","))
    points = []
    for item in split_top(rest, ","):
        parts = split_top(item, ":")
        if len(parts) != len(keys) or "" in parts:
            raise RecipeError(f"{where}: '{item}' has {len(parts)} values for {len(keys)} keys")
        points.append(tuple(parse_value(p) for p in parts))
    return Dimension(keys, tuple(points), where)


def parse_sweep_table(table: Any, where: str) -> tuple[list[Dimension], int | None]:
    """The dimensions and seed count of a recipe file's ``[sweep]`` table."""
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: [sweep] must be a table")
    unknown = sorted(set(table) - {"param", "zip", "seeds", *SEARCH_KEYS})
    if unknown:
        raise RecipeError(
            f"{where}: unknown [sweep] key '{unknown[0]}': use param, zip, seeds or "
            + ", ".join(SEARCH_KEYS)
        )
    dims = []
    params = table.get("param", {})
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: sweep.param must be a table of KEY = [values] or 'A..B:log:N'")
    for key, spec in flatten(params).items():
        key_where = f"{where}: sweep.param.{key}"
        canonical = canonical_key(key, key_where)
        if isinstance(spec, list) and spec:
            values = _values(canonical, spec, key_where)
        elif isinstance(spec, str) and _expand(canonical, spec, key_where):
            values = _values(canonical, [spec], key_where)
        else:
            raise RecipeError(
                f"{key_where}: write a non-empty list of values or a range 'A..B:log:N'"
            )
        dims.append(Dimension((canonical,), tuple((v,) for v in values), key_where))
    groups = table.get("zip", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise RecipeError(f"{where}: sweep.zip must be a list of tables {{KEY = [values], ...}}")
    for group in groups:
        flat = flatten(group)
        lengths = {len(v) if isinstance(v, list) else -1 for v in flat.values()}
        if not flat or len(lengths) != 1 or -1 in lengths or 0 in lengths:
            raise RecipeError(f"{where}: each sweep.zip group needs lists of one common length")
        keys = tuple(canonical_key(k, f"{where}: sweep.zip") for k in flat)
        points = tuple(zip(*flat.values(), strict=True))
        dims.append(Dimension(keys, points, f"{where}: sweep.zip"))
    seeds = table.get("seeds")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int)):
        raise RecipeError(f"{where}: sweep.seeds must be a whole number")
    return dims, seeds


def describe_sweep_keys() -> list[tuple[str, str, str]]:
    """(``sweep.<key>``, default, description) for ``cl keys``: the ``[sweep]`` table."""
    return [
        (
            "sweep.param",
            "{}",
            "cl sweep: KEY = [values] or a range 'A..B:lin:N', 'A..B:log:N', 'A..B:xF'; one "
            "dimension per key (--param replaces the key's)",
        ),
        (
            "sweep.zip",
            "[]",
            "cl sweep: a list of tables { KEY = [values], ... } whose keys move together",
        ),
        (
            "sweep.seeds",
            "-",
            "cl sweep: N runs per point, train.seed + 0..N-1 (--seeds replaces it)",
        ),
        (
            "sweep.search",
            "-",
            "cl sweep: tpe or random: search instead of a grid; sweep.param values are then "
            "ranges 'A..B', 'A..B:log' or lists of choices (--search replaces it)",
        ),
        ("sweep.trials", "-", "cl sweep: trials of a search (--trials replaces it)"),
        (
            "sweep.objective",
            "knn_top1",
            "cl sweep: summary metric a search optimises (--objective replaces it)",
        ),
        ("sweep.direction", "maximize", "cl sweep: maximize or minimize the objective"),
        (
            "sweep.pruner",
            "hyperband",
            "cl sweep: halving, hyperband or none: early stopping on the kNN monitor",
        ),
    ]


# -- compiling ---------------------------------------------------------------------------------


def merge_dimensions(file_dims: list[Dimension], flag_dims: list[Dimension]) -> list[Dimension]:
    """Flags replace file dimensions that share a key; a key swept twice is an error."""
    flag_keys = {k for d in flag_dims for k in d.keys}
    dims = [d for d in file_dims if not flag_keys & set(d.keys)] + flag_dims
    seen: set[str] = set()
    for dim in dims:
        for key in dim.keys:
            if key in seen:
                raise RecipeError(f"sweep: '{key}' is swept by two dimensions: sweep it once")
            seen.add(key)
    return dims


def _refuse_swept_stage_keys(dims: list[Dimension]) -> None:
    """Stage keys are left out of a run's id, so values of one would collapse into one run:
    refused, with the command that does sweep a stage setting."""
    for dim in dims:
        for key in dim.keys:
            if key.partition(".")[0] in STAGE_TABLES:
                raise RecipeError(
                    f"{dim.source}: {key} is a stage key, not part of a run: a sweep varies "
                    f"runs; try each value on the finished runs with cl eval RUN --set {key}=..."
                )


def compile_sweep(
    path: Path,
    *,
    params: Sequence[str] = (),
    zips: Sequence[str] = (),
    seeds: int | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> Sweep:
    """Expand and validate every run of a sweep; writes nothing.

    ``overrides`` are parsed ``--set`` assignments applied to every run before the swept values.
    """
    path = Path(path)
    table = read_toml(path)
    file_dims, file_seeds = parse_sweep_table(table.get("sweep", {}), str(path))
    flag_dims = [parse_param(p) for p in params] + [parse_zip(z) for z in zips]
    dims = merge_dimensions(file_dims, flag_dims)
    _refuse_swept_stage_keys(dims)
    base = resolve(table, list(overrides), source=str(path), default_name=path.stem)
    if seeds is None and not any(SEED_KEY in d.keys for d in flag_dims):
        seeds = file_seeds
    if seeds is not None:
        if seeds < 1:
            raise RecipeError(f"--seeds {seeds}: needs at least 1 seed")
        if any(SEED_KEY in d.keys for d in dims):
            raise RecipeError(f"sweep: '{SEED_KEY}' is swept and seeds are asked for: choose one")
        seed_points = tuple((base.train.seed + i,) for i in range(seeds))
        dims.append(Dimension((SEED_KEY,), seed_points, f"--seeds {seeds}"))
    total = math.prod(len(d.points) for d in dims)
    if total > MAX_RUNS:
        raise RecipeError(f"sweep: {total} runs is more than {MAX_RUNS}: check the ranges")
    swept = tuple(k for d in dims for k in d.keys)
    sources = {k: d.source for d in dims for k in d.keys}
    runs: dict[str, PlannedRun] = {}
    for combo in itertools.product(*(d.points for d in dims)):
        assigned = [
            (k, v)
            for d, point in zip(dims, combo, strict=True)
            for k, v in zip(d.keys, point, strict=True)
        ]
        recipe = resolve(
            table,
            [*overrides, *assigned],
            source=str(path),
            default_name=path.stem,
            override_sources=sources,
        )
        resolved = flatten(recipe.to_dict())
        runs.setdefault(recipe.fingerprint, PlannedRun(recipe, {k: resolved[k] for k in swept}))
    definition = {
        "source": str(path),
        "name": base.name,
        "base_fingerprint": base.fingerprint,
        "dimensions": [d.as_json() for d in dims],
    }
    blob = json.dumps(definition | {"source": None}, sort_keys=True, default=str)
    slurm = table.get("slurm", {})
    if not isinstance(slurm, dict):
        raise RecipeError(f"{path}: [slurm] must be a table")
    return Sweep(
        sweep_id=hashlib.sha256(blob.encode()).hexdigest()[:10],
        source=path,
        definition=definition,
        swept_keys=swept,
        runs=tuple(runs.values()),
        slurm=slurm,
    )


# -- the manifest ------------------------------------------------------------------------------


def run_entries(sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """The manifest's per-run records, keeping the submissions an earlier launch recorded."""
    previous = read_json(sweep.folder(out) / MANIFEST) or {}
    runs = {r["run_id"]: r for r in previous.get("runs", [])}
    entries = []
    for run in sweep.runs:
        before = runs.get(run.run_id, {})
        entry = {
            "run_id": run.run_id,
            "run_dir": f"{run.recipe.name}/{run.run_id}",
            "recipe": f"{RECIPES}/{run.run_id}.toml",
            "params": run.params,
            "submissions": before.get("submissions", []),
        }
        if run.recipe.stages.run:
            entry["stages"] = stage_entries(run)
            entry["stage_submissions"] = before.get("stage_submissions", [])
        entries.append(entry)
    return entries


def stage_entries(run: PlannedRun) -> list[dict[str, Any]]:
    """A run's stages as the manifest lists them: what status and report need to find them."""
    return [
        {
            "stage_id": stage.stage_id,
            "label": stage.label,
            "parent": stage.parent_id,
            "run_dir": f"{run.recipe.name}/{run.run_id}/{STAGES}/{stage.stage_id}",
        }
        for stage in plan_stages(run.recipe)
    ]


def write_sweep(sweep: Sweep, out: Path) -> dict[str, Any]:
    """Write (or refresh) the sweep folder: one recipe file per run and the manifest."""
    folder = sweep.folder(out)
    for run in sweep.runs:
        recipe_file = folder / RECIPES / f"{run.run_id}.toml"
        if not recipe_file.exists():
            atomic_write_text(recipe_file, to_toml(run.recipe))
    previous = read_json(folder / MANIFEST) or {}
    manifest = {
        "version": 1,
        "sweep_id": sweep.sweep_id,
        "created_at": previous.get("created_at", time.time()),
        "definition": sweep.definition,
        "swept_keys": list(sweep.swept_keys),
        "runs": run_entries(sweep, out),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def load_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a sweep folder, or a one-line error saying what is wrong with the path."""
    manifest = read_json(Path(folder) / MANIFEST)
    if manifest is None or not isinstance(manifest.get("runs"), list):
        raise InputError(f"{folder}: not a sweep folder (no readable {MANIFEST})")
    return manifest


def record_submissions(
    folder: Path, submissions: dict[str, dict[str, Any]], field: str = "submissions"
) -> None:
    """Append one submission record per run id (attempt numbers count up per run);
    ``field="stage_submissions"`` records the job of a run's stages."""
    manifest = load_manifest(folder)
    for entry in manifest["runs"]:
        record = submissions.get(entry["run_id"])
        if record is not None:
            entry.setdefault(field, [])
            entry[field].append({**record, "attempt": len(entry[field]) + 1})
    atomic_write_json(Path(folder) / MANIFEST, manifest)


def sweep_out(folder: Path) -> Path:
    """The ``--out`` root a sweep folder lives in (run folders are relative to it)."""
    return Path(folder).resolve().parent.parent
