"""The ``cl`` command as a user meets it: help, version, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cl

ROOT = Path(__file__).resolve().parents[1]


def cl(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cl(*args, cwd=cwd, timeout=120, env=env)


def test_version_and_help(tmp_path: Path) -> None:
    version = cl("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.startswith("cltool ")
    helped = cl("run", "--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "--set" in helped.stdout and "cl run recipes/moco.toml" in helped.stdout


def test_keys_lists_every_key(tmp_path: Path) -> None:
    listed = cl("keys", cwd=tmp_path)
    assert listed.returncode == 0
    assert "key_encoder.m" in listed.stdout and "dictionary.K" in listed.stdout


@pytest.mark.parametrize(
    ("recipe_text", "args", "expected"),
    [
        ("[loss]\ntemprature = 0.1\n", [], "did you mean 'loss.T'?"),
        ("[loss\n", [], "malformed TOML"),
        ("", ["--set", "m=1.5"], "key_encoder.m = 1.5 is out of range"),
        ("", ["--set", "data.dataset=imagenet"], "data.dataset"),
        (None, [], "no such recipe file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, recipe_text: str | None, args: list[str], expected: str
) -> None:
    recipe = tmp_path / "bad.toml"
    if recipe_text is not None:
        recipe.write_text(recipe_text)
    result = cl("run", str(recipe), "--out", str(tmp_path / "runs"), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_root_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    recipe = tmp_path / "folder.toml"
    recipe.write_text(f"[data]\ndataset = 'imagefolder'\nroot = '{tmp_path / 'absent'}'\n")
    result = cl("run", str(recipe), "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode != 0
    assert str(tmp_path / "absent") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_compile_without_a_cpp_compiler_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """On a CPU, torch.compile builds C++ kernels: with no compiler on PATH the run is refused
    before anything is written, instead of failing at the first step with inductor's trace."""
    no_compiler = {"PATH": str(Path(sys.executable).parent), "CXX": ""}
    result = cl(
        "run", str(ROOT / "recipes" / "moco.toml"), "--out", str(tmp_path / "runs"),
        "--set", "train.compile=true", "--set", 'train.device="cpu"', cwd=tmp_path, env=no_compiler,
    )  # fmt: skip
    assert result.returncode == 2
    assert "train.compile = true" in result.stderr and "no C++ compiler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists()
