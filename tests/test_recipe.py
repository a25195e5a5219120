"""Recipe loading, overrides, validation messages and fingerprints."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cltool.errors import RecipeError
from cltool.recipe import (
    SHORT_NAMES,
    Recipe,
    all_keys,
    describe_keys,
    load_recipe,
    parse_assignment,
    resolve,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads() -> None:
    recipes = sorted((ROOT / "recipes").rglob("*.toml"))
    assert recipes, "recipes/ holds no recipe"
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.name == path.stem


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "[loss]\nT = 0.07\n"))
    assert recipe.loss.T == 0.07
    assert recipe.dictionary.K == Recipe().dictionary.K
    assert recipe.name == "r"


def test_short_names_and_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    recipe = load_recipe(
        path,
        [
            "m=0.5",
            "K=1024",
            "T=0.1",
            "epochs=3",
            "batch_size=64",
            "seed=7",
            "lr=0.1",
            "data.dataset=digits",
            "optim.name='adamw'",
        ],
    )
    assert recipe.key_encoder.m == 0.5
    assert recipe.dictionary.K == 1024
    assert recipe.loss.T == 0.1
    assert recipe.train.epochs == 3
    assert recipe.train.batch_size == 64
    assert recipe.train.seed == 7
    assert recipe.optim.lr == 0.1
    assert recipe.data.dataset == "digits"  # a bare word is taken as a string
    assert recipe.optim.name == "adamw"
    assert set(SHORT_NAMES) == {"K", "m", "T", "epochs", "batch_size", "seed", "lr"}


def test_integer_is_accepted_where_a_float_is_expected(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "[optim]\nlr = 1\n"))
    assert isinstance(recipe.optim.lr, float)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (
            "[loss]\ntemprature = 0.1\n",
            [],
            "unknown key 'loss.temprature' (did you mean 'loss.T'?)",
        ),
        ("[dictionry]\nK = 3\n", [], "did you mean 'dictionary.K'?"),
        ("", ["m=1.0"], "key_encoder.m = 1.0 is out of range: must be in [0, 1)"),
        ("", ["m=-0.1"], "must be in [0, 1)"),
        ("", ["K=0"], "dictionary.K = 0 is out of range: must be >= 1"),
        ("", ["T=0"], "--set: loss.T = 0 is out of range: must be > 0"),
        ("", ["epochs=0"], "train.epochs = 0 is out of range: must be >= 1"),
        ("", ["epochs=2.5"], "train.epochs = 2.5 must be a whole number"),
        ("", ["data.dataset=cifar"], "did you mean 'cifar10'?"),
        ("", ["method=simclrr"], 'method = "simclrr" is unknown'),
        ("", ["model.backbone=vgg"], "choose one of small_cnn, resnet18, resnet50"),
        ("", ["train.device=gpu"], "is not a device"),
        ("", ["eval.linear=1"], "must be true or false"),
        ("K = 5\n", [], "'K' is a command-line short name; in a file write 'dictionary.K'"),
        ("[augment]\ncrop_min_scale = 0.9\ncrop_max_scale = 0.5\n", [], "make min <= max"),
        ("[loss\nT = 1\n", [], "malformed TOML"),
        ("", ["nokey=3"], "unknown key 'nokey'"),
        ("", ["m"], "expected KEY=VALUE"),
    ],
)
def test_bad_input_gives_one_line_naming_the_key(
    tmp_path: Path, text: str, overrides: list[str], expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert caught.value.exit_code == 2
    if not overrides:
        assert str(path) in message


def test_malformed_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "method = 'moco'\n\n[loss]\nT = = 1\n")
    with pytest.raises(RecipeError, match="line 4"):
        load_recipe(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_fingerprint_is_the_hash_of_the_resolved_recipe(tmp_path: Path) -> None:
    explicit = load_recipe(write(tmp_path, "[loss]\nT = 0.2\n", "a.toml"))
    implicit = load_recipe(write(tmp_path, "", "b.toml"))
    assert explicit.fingerprint == implicit.fingerprint  # a default written out is the same run
    assert load_recipe(tmp_path / "b.toml", ["T=0.3"]).fingerprint != implicit.fingerprint
    logged = load_recipe(tmp_path / "b.toml", ["wandb.project='x'"])
    assert logged.fingerprint == implicit.fingerprint  # where results go is not what they are
    assert len(implicit.fingerprint) == 10


def test_resolved_toml_round_trips_to_the_same_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes" / "moco.toml", ["m=0.999", "wandb.tags=['a', 'b']"])
    again = resolve(tomllib.loads(to_toml(recipe)))
    assert again == recipe
    assert again.fingerprint == recipe.fingerprint


def test_parse_assignment_canonicalises_short_names() -> None:
    assert parse_assignment("m=0.9") == ("key_encoder.m", 0.9)
    assert parse_assignment("K=[1, 2]") == ("dictionary.K", [1, 2])


def test_every_key_is_documented() -> None:
    rows = describe_keys()
    assert [key for key, _, _ in rows] == list(all_keys())
    assert all(doc for _, _, doc in rows), [key for key, _, doc in rows if not doc]
    m_row = next(row for row in rows if row[0] == "key_encoder.m")
    assert "in [0, 1)" in m_row[2] and "(short: m)" in m_row[2]
