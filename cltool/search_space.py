"""A search's space: what each ``--param`` (or ``[sweep].param`` entry) of a search means.

    KEY=A..B          a continuous range, uniform (an integer range for an integer key)
    KEY=A..B:log      the same, uniform in log space (A > 0)
    KEY=V1,V2,...     categorical choices (a grid range such as A..B:lin:N gives its values)

Each becomes a :class:`SearchParam`, which turns into an Optuna distribution only when a study
asks (optuna is imported there, not here). Grid forms keep their meaning in :mod:`cltool.sweep`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cltool.errors import RecipeError
from cltool.recipe import canonical_key, expects_integer, expects_number, flatten, short_key
from cltool.sweep import parse_param, parse_sweep_table, split_param

if TYPE_CHECKING:
    import optuna


_DISTRIBUTION = re.compile(r"^(?P<a>[^:,]+?)\.\.(?P<b>[^:,]+?)(?::(?P<log>log))?$")


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search space: a float or int range (uniform or log) or choices."""

    key: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    #: Where it was given, named by its errors; not part of the search's identity.
    source: str = field(default="", compare=False)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return FloatDistribution(float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]

    def as_json(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"key": self.key, "kind": self.kind, "choices": list(self.choices)}
        return {
            "key": self.key,
            "kind": self.kind,
            "low": self.low,
            "high": self.high,
            "log": self.log,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> SearchParam:
        return cls(
            key=value["key"],
            kind=value["kind"],
            low=value.get("low"),
            high=value.get("high"),
            log=bool(value.get("log", False)),
            choices=tuple(value.get("choices", ())),
        )

    def describe(self) -> str:
        """As it would be written on the command line."""
        name = short_key(self.key)
        if self.kind == "categorical":
            return f"{name}=" + ",".join(str(c) for c in self.choices)
        return f"{name}={self.low}..{self.high}" + (":log" if self.log else "")


def is_distribution(text: str) -> bool:
    """Whether ``--param`` text is ``KEY=A..B`` or ``KEY=A..B:log`` with numbers A and B (a
    search's range; ``m=a..b`` is just a bad value)."""
    match = _DISTRIBUTION.match(text.partition("=")[2].strip())
    try:
        return match is not None and all(float(match[end]) is not None for end in "ab")
    except ValueError:
        return False


def _parse_range(key: str, text: str, where: str) -> SearchParam:
    """``A..B`` or ``A..B:log`` for ``key``; an integer key gets an integer range."""
    match = _DISTRIBUTION.match(text.strip())
    assert match is not None
    if not expects_number(key):
        raise RecipeError(f"{where}: '{key}' is not a number: give its choices, KEY=v1,v2")
    integral = expects_integer(key)
    try:
        low, high = ((int if integral else float)(end) for end in (match["a"], match["b"]))
    except ValueError:
        kind = "whole numbers" if integral else "numbers"
        raise RecipeError(f"{where}: the ends must be {kind}, e.g. {short_key(key)}=A..B") from None
    log = match["log"] is not None
    if not low < high:
        raise RecipeError(f"{where}: the range needs A < B, got {low}..{high}")
    if log and low <= 0:
        raise RecipeError(f"{where}: a log range needs A > 0, got {low}; drop ':log' or raise A")
    return SearchParam(key, "int" if integral else "float", low, high, log, source=where)


def _categorical(key: str, values: Sequence[Any], where: str) -> SearchParam:
    """Choices Optuna can store (numbers, strings, booleans), duplicates dropped."""
    choices = tuple(dict.fromkeys(values))
    if any(not isinstance(v, bool | int | float | str) for v in choices):
        raise RecipeError(f"{where}: a searched choice must be a number, string or boolean")
    return SearchParam(key, "categorical", choices=choices, source=where)


def parse_search_param(text: str) -> SearchParam:
    """One ``--param`` of a search: a range (``A..B``, ``A..B:log``) or choices."""
    key, rest, where = split_param(text, "KEY=A..B, KEY=A..B:log or KEY=V1,V2,...")
    if _DISTRIBUTION.match(rest.strip()):
        return _parse_range(key, rest, where)
    dim = parse_param(text)
    return _categorical(key, [p[0] for p in dim.points], where)


def file_space(table: Mapping[str, Any], where: str) -> list[SearchParam]:
    """The ``[sweep].param`` entries of a recipe file, read as a search space."""
    space = []
    for key, spec in flatten(dict(table.get("param", {}))).items():
        key_where = f"{where}: sweep.param.{key}"
        canonical = canonical_key(key, key_where)
        if isinstance(spec, str) and _DISTRIBUTION.match(spec.strip()):
            space.append(_parse_range(canonical, spec, key_where))
        elif (isinstance(spec, list) and spec) or isinstance(spec, str):
            dim = parse_sweep_table({"param": {key: spec}}, where)[0][0]
            space.append(_categorical(canonical, [p[0] for p in dim.points], key_where))
        else:
            raise RecipeError(f"{key_where}: write a range 'A..B', 'A..B:log' or a list of choices")
    return space


def describe_params(params: Mapping[str, Any]) -> str:
    """``lr=0.0123 T=0.2``: a trial's values, short keys, four significant digits."""
    return " ".join(
        f"{short_key(k)}={v:.4g}" if isinstance(v, float) else f"{short_key(k)}={v}"
        for k, v in params.items()
    )
