"""The ``cl`` command as a user meets it: help, version, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from helpers import MOCO, invoke, run_cl

from cltool.cli import app
from cltool.cli_common import SLURM_FLAGS
from cltool.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
#: A PATH with this interpreter and no SLURM client on it.
NO_SLURM = {"PATH": str(Path(sys.executable).parent)}


def cl(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cl(*args, cwd=cwd, timeout=120, env=env)


def test_version_and_help(tmp_path: Path) -> None:
    version = cl("--version", cwd=tmp_path)
    assert version.returncode == 0
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert version.stdout.strip() == f"cltool {pyproject['project']['version']}"
    helped = cl("run", "--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "--set" in helped.stdout and "cl run recipes/moco.toml" in helped.stdout


def test_keys_lists_every_key(tmp_path: Path) -> None:
    listed = cl("keys", cwd=tmp_path)
    assert listed.returncode == 0
    assert "key_encoder.m" in listed.stdout and "dictionary.K" in listed.stdout
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if "│" in line}
    assert "the recipe file's name" in rows["name"] and '"run"' not in rows["name"]
    for key in ("sweep.param", "sweep.zip", "sweep.seeds", *(f"slurm.{k}" for k in SLURM_FLAGS)):
        assert key in rows, key
    assert "A..B:log:N" in rows["sweep.param"] and "[values]" in rows["sweep.param"]


@pytest.mark.parametrize(
    ("recipe_text", "args", "expected"),
    [
        ("[loss]\ntemprature = 0.1\n", [], "did you mean 'loss.T'?"),
        ("[loss\n", [], "malformed TOML"),
        ("", ["--set", "m=1.5"], "key_encoder.m = 1.5 is out of range"),
        ("", ["--set", "data.dataset=imagenet"], "data.dataset"),
        (None, [], "no such recipe file"),
        ("", ["--set", "t=0.1"], "unknown key 't' (did you mean 'T', short for 'loss.T'?)"),
        ("", ["--set", "epoch=3"], "(did you mean 'epochs', short for 'train.epochs'?)"),
        ("", ["--set", "k=10"], "(did you mean 'K', short for 'dictionary.K'?)"),
        ("", ["--set", "dictionary.kind=memory_bank"], '--set: method = "moco" needs'),
        ("", ["--executor", "pbs"], "--executor pbs: choose one of local, slurm"),
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
    assert result.returncode == 2  # a missing folder is bad input
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


def test_slot_clash_from_set_blames_set_not_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text('method = "moco"\n')
    result = invoke("run", recipe, "--set", "method=simclr", "--out", tmp_path / "runs")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert message.startswith('error: --set: method = "simclr" needs key_encoder.kind')
    assert "--set key_encoder.kind=shared" in message and "set it in the recipe" not in message
    assert not (tmp_path / "runs").exists()


def test_a_folder_given_as_recipe_is_named_a_folder(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.toml").write_text("")
    result = invoke("run", tmp_path / "recipes", "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert "is a folder, not a recipe file" in result.stderr
    assert str(tmp_path / "recipes" / "a.toml") in result.stderr
    assert "no such recipe file" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["sweep", MOCO, "--executor", "pbs"],
        ["sweep", MOCO, "--jobs", "0"],
        ["sweep", MOCO, "--param", "m"],
        ["sweep", MOCO, "--executor", "slurm", "--sbatch", "exclude"],
        ["run", MOCO, "--executor", "slurm", "--time", "soon"],
        ["status", "nowhere"],
        ["status", "nowhere", "--format", "xml"],
        ["report", "nowhere"],
        ["sync", "nowhere"],
        ["run", MOCO, "--bogus-flag"],
    ],
)
def test_bad_input_exits_2_in_every_command(tmp_path: Path, args: list[str | Path]) -> None:
    """One rule: bad input (a flag value, a path, usage) is exit code 2 in every command."""
    out = ["--out", tmp_path / "runs"] if args[0] in ("run", "sweep") else []
    result = invoke(*args, *out)
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


# -- SLURM -------------------------------------------------------------------------------------


def test_run_and_sweep_offer_the_same_slurm_flags() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("run", "sweep"):
        params = {p.name for p in commands[name].params}
        assert {*SLURM_FLAGS, "dry_run"} <= params, name


def test_local_dry_run_says_where_the_run_would_train_and_writes_nothing(tmp_path: Path) -> None:
    result = invoke("run", MOCO, "--dry-run", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    fingerprint = load_recipe(MOCO).fingerprint
    assert f"would train in {tmp_path / 'runs' / 'moco' / fingerprint}" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_run_slurm_dry_run_prints_the_job_script_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = invoke(
        "run", MOCO, "--executor", "slurm", "--dry-run", "--out", out, "--partition", "gpu",
        "--time", "4:00:00", "--account", "lab", "--qos", "high", "--gpus-per-node", "2",
        "--mem-gb", "8", "--constraint", "a100", "--sbatch", "exclude=node3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --mem=8192M",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclude=node3",
    ):
        assert line in result.stdout, line
    assert "#SBATCH --array" not in result.stdout
    note = next(line for line in result.stdout.splitlines() if line.startswith("note:"))
    assert "--cpus-per-task" in note and "--mem-gb" not in note
    assert "dry run: nothing submitted" in result.stdout
    assert not out.exists()


def test_a_recipes_slurm_table_sizes_cl_run_and_flags_override_it(tmp_path: Path) -> None:
    recipe = tmp_path / "job.toml"
    recipe.write_text('[slurm]\npartition = "cpu"\ncpus_per_task = 4\nmem_gb = 2\n')
    result = invoke(
        "run", recipe, "--executor", "slurm", "--dry-run", "--partition", "gpu",
        "--out", tmp_path / "runs",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "#SBATCH --partition=gpu" in result.stdout
    assert "#SBATCH --cpus-per-task=4" in result.stdout and "note:" not in result.stdout


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_slurm_without_sbatch_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, command: str
) -> None:
    out = tmp_path / "runs"
    args = [command, MOCO, "--executor", "slurm", "--out", out]
    result = invoke(*args, *(["--param", "m=0.9"] if command == "sweep" else []), env=NO_SLURM)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no `sbatch` on PATH" in lines[0]
    assert "--executor local" in lines[0]
    assert result.stdout == ""  # not even "submitting"
    assert not out.exists()
    # the dry run needs no SLURM
    dry = invoke(*args, "--dry-run", env=NO_SLURM)
    assert dry.exit_code == 0 and "#SBATCH" in dry.stdout and not out.exists()
