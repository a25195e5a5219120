"""W&B through the sink with the real wandb package in offline mode, read back from the offline
run files (config, history, summary); resume keeps one run id; W&B errors never reach training;
``cl sync`` fails in one line, fast, without network or key."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cltool import wandb_log
from cltool.cli_report import register
from cltool.recipe import Recipe, resolve
from cltool.track import RunDir

BLOCK = 32 * 1024
HEADER = 7  # ":W&B", a 2-byte magic, a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """The Record messages of a ``run-<id>.wandb`` file (a log of 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # too little left for a chunk header: block padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def offline_session(folder: Path) -> dict[str, Any]:
    """What one offline session of a run holds: run fields, config, history rows, summary."""
    (log,) = folder.glob("run-*.wandb")
    session: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            session["run"] = record.run
            for item in record.run.config.update:
                session["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                session["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            session["history"].append(
                {_key(item): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                session["summary"][_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            session["exit_code"] = record.exit.exit_code
    return session


def sessions(run_dir: RunDir) -> list[dict[str, Any]]:
    return [offline_session(f) for f in sorted((run_dir.path / "wandb").glob("offline-run-*"))]


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key, no server, every W&B folder in tmp: the home folder must stay empty."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    return home


def recipe_and_dir(tmp_path: Path, **wandb: Any) -> tuple[Recipe, RunDir]:
    recipe = resolve({"name": "moco", "wandb": {"enabled": True, "project": "cltest", **wandb}})
    run_dir = RunDir.for_run(tmp_path / "runs", recipe.name, recipe.fingerprint)
    run_dir.path.mkdir(parents=True)
    return recipe, run_dir


RECORDS = [
    {"kind": "step", "epoch": 0, "global_step": 2, "loss": 7.5, "lr": 0.06},
    {"kind": "epoch", "epoch": 0, "global_step": 4, "loss": 7.0, "knn_top1": 31.0},
    {"kind": "step", "epoch": 1, "global_step": 6, "loss": 6.5, "lr": 0.05},
]


def test_offline_run_holds_config_history_and_summary(tmp_path: Path, offline_env: Path) -> None:
    recipe, run_dir = recipe_and_dir(tmp_path, tags=["paper"])
    lines: list[str] = []
    sink = wandb_log.open_wandb(recipe, run_dir, "sweep7", {"key_encoder.m": 0.99}, lines.append)
    assert sink is not None
    for record in RECORDS:
        sink.log(record)
    sink.finish({"knn_top1": 42.5, "linear_top1": 50.0, "versions": {"torch": "x"}}, "done")

    assert len(lines) == 1 and "logging offline" in lines[0] and "cl sync" in lines[0]
    (session,) = sessions(run_dir)
    run = session["run"]
    assert run.run_id == run.display_name == recipe.fingerprint
    assert (run.project, run.run_group, run.job_type) == ("cltest", "sweep7", "moco")
    assert list(run.tags) == ["paper", "m=0.99"]
    config = {k: v for k, v in session["config"].items() if k != "_wandb"}
    assert config == recipe.to_dict()
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in session["history"]]
    assert rows == [
        {"epoch": 0, "global_step": 2, "step/loss": 7.5, "step/lr": 0.06},
        {"epoch": 0, "global_step": 4, "epoch/loss": 7.0, "epoch/knn_top1": 31.0},
        {"epoch": 1, "global_step": 6, "step/loss": 6.5, "step/lr": 0.05},
    ]
    assert session["summary"]["knn_top1"] == 42.5
    assert session["summary"]["status"] == "done"
    assert session["summary"]["versions"] == {"torch": "x"}
    assert session["exit_code"] == 0
    assert not any(offline_env.rglob("*")), "W&B wrote into the home folder"


def test_resume_continues_the_same_wandb_run(tmp_path: Path) -> None:
    recipe, run_dir = recipe_and_dir(tmp_path)
    first = wandb_log.open_wandb(recipe, run_dir, None, None, lambda line: None)
    assert first is not None
    first.log(RECORDS[0])
    first.finish(None, "interrupted")
    second = wandb_log.open_wandb(recipe, run_dir, None, None, lambda line: None)
    assert second is not None
    second.log(RECORDS[2])
    second.finish({"knn_top1": 40.0}, "done")

    before, after = sessions(run_dir)
    assert before["run"].run_id == after["run"].run_id == recipe.fingerprint
    assert [row["global_step"] for row in before["history"]] == [2]
    assert [row["global_step"] for row in after["history"]] == [6]
    assert (before["summary"]["status"], before["exit_code"]) == ("interrupted", 1)
    assert (after["summary"]["knn_top1"], after["exit_code"]) == (40.0, 0)


def test_wandb_errors_are_reported_once_and_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, run_dir = recipe_and_dir(tmp_path)
    lines: list[str] = []
    sink = wandb_log.open_wandb(recipe, run_dir, None, None, lines.append)
    assert sink is not None

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the service went away")

    monkeypatch.setattr(sink.run, "log", broken)
    monkeypatch.setattr(sink.run, "finish", broken)
    sink.log(RECORDS[0])
    sink.log(RECORDS[1])
    sink.finish({"knn_top1": 1.0}, "done")
    assert len(lines) == 2  # the offline line, then one for every W&B failure
    assert "logging failed (RuntimeError: the service went away); training goes on" in lines[1]
    again = wandb_log.open_wandb(recipe, run_dir, None, None, lines.append)
    assert again is not None, "a failed finish must not block the next run of the process"
    again.log(RECORDS[2])
    again.finish({"knn_top1": 2.0}, "done")
    assert sessions(run_dir)[-1]["summary"]["knn_top1"] == 2.0


def test_disabled_gives_no_sink(tmp_path: Path) -> None:
    recipe = resolve({})
    assert wandb_log.open_wandb(recipe, RunDir(tmp_path), None, None) is None


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_mode_auto_needs_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_log.choose_mode("auto") == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_log.choose_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_log.choose_mode("auto") == "offline"
    assert wandb_log.choose_mode("online") == "online"


def test_online_without_network_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    recipe, run_dir = recipe_and_dir(tmp_path, mode="online")
    lines: list[str] = []
    sink = wandb_log.open_wandb(recipe, run_dir, None, None, lines.append)
    assert sink is not None
    sink.log(RECORDS[0])
    sink.finish({"knn_top1": 3.0}, "done")
    assert len(lines) == 1 and "online start failed (cannot reach" in lines[0]
    (session,) = sessions(run_dir)
    assert session["summary"]["knn_top1"] == 3.0


def test_tags_and_rows() -> None:
    assert wandb_log.swept_tags({"dictionary.K": 4096, "optim.name": "sgd"}) == [
        "K=4096",
        "optim.name=sgd",
    ]
    row = wandb_log.history_row({"kind": "eval", "epoch": 2, "global_step": 9, "note": "x"})
    assert row == {"epoch": 2, "global_step": 9}


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_sync_without_key_or_network_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, run_dir = recipe_and_dir(tmp_path)
    sink = wandb_log.open_wandb(recipe, run_dir, None, None, lambda line: None)
    assert sink is not None
    sink.finish({"knn_top1": 1.0}, "done")
    runs = str(tmp_path / "runs")
    (offline,) = wandb_log.unsynced_runs(tmp_path / "runs")

    result = CliRunner().invoke(cli(), ["sync", runs])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1
    assert f"cannot sync {offline}: no W&B API key; run `wandb login`" in result.stderr

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", closed_port_url())
    result = CliRunner().invoke(cli(), ["sync", runs, "--timeout", "20"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert f"cannot sync {offline}: cannot reach" in result.stderr

    next(offline.glob("run-*.wandb")).with_suffix(".wandb.synced").touch()
    result = CliRunner().invoke(cli(), ["sync", runs])
    assert result.exit_code == 0 and "nothing to sync" in result.stdout


def test_sync_to_a_silent_server_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that accepts connections and never answers: killed after --timeout, one line."""
    recipe, run_dir = recipe_and_dir(tmp_path)
    sink = wandb_log.open_wandb(recipe, run_dir, None, None, lambda line: None)
    assert sink is not None
    sink.finish(None, "failed")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        result = CliRunner().invoke(cli(), ["sync", str(tmp_path / "runs"), "--timeout", "3"])
    assert time.monotonic() - started < 15
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "W&B did not answer within 3 s (0 synced)" in result.stderr


@pytest.mark.slow
def test_a_real_run_logs_its_config_and_summary_offline(tmp_path: Path) -> None:
    """End to end: `cl run` with W&B on and no key logs offline; the files hold the run."""
    from cltool.run import run_recipe

    recipe = resolve(
        {
            "name": "tiny",
            "data": {"num_train": 256, "num_test": 64},
            "model": {"width": 8},
            "dictionary": {"K": 128},
            "train": {"epochs": 2, "batch_size": 64, "log_every_steps": 2, "threads": 2},
            "eval": {"linear_epochs": 5, "baselines": False},
            "wandb": {"enabled": True, "project": "cltest"},
        }
    )
    outcome = run_recipe(recipe, tmp_path, quiet=True, sweep_id="s1", swept={"loss.T": 0.2})
    assert outcome.summary is not None
    (session,) = sessions(outcome.run_dir)
    assert session["run"].run_id == recipe.fingerprint and session["run"].run_group == "s1"
    assert list(session["run"].tags) == ["T=0.2"]
    assert session["config"]["train"] == recipe.to_dict()["train"]
    assert session["summary"]["knn_top1"] == outcome.summary["knn_top1"]
    logged = [r for r in outcome.run_dir.records() if r["kind"] == "epoch"]
    rows = [row for row in session["history"] if "epoch/loss" in row]
    assert [row["epoch/loss"] for row in rows] == [r["loss"] for r in logged]
    assert session["exit_code"] == 0


def test_wandb_on_a_finished_run_logs_it_from_its_folder_once(tmp_path: Path) -> None:
    """`cl run --wandb` on a run that finished without W&B sends its config, every record and
    its summary in one go (offline here); a second time it says where the run is logged."""
    from cltool.cli import app
    from cltool.recipe import to_toml
    from cltool.run import run_recipe

    recipe = resolve(
        {
            "name": "tiny",
            "data": {"num_train": 256, "num_test": 64},
            "model": {"width": 8},
            "train": {"epochs": 2, "batch_size": 64, "log_every_steps": 2},
            "eval": {"linear": False, "baselines": False},
            "wandb": {"project": "cltest"},
        }
    )
    outcome = run_recipe(recipe, tmp_path, quiet=True)
    assert not (outcome.run_dir.path / "wandb").exists()
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(to_toml(recipe))
    args = ["run", str(recipe_file), "--out", str(tmp_path), "--wandb"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"W&B: logged run {recipe.fingerprint} from its folder" in first.stderr
    (session,) = sessions(outcome.run_dir)
    assert session["run"].run_id == recipe.fingerprint
    assert session["config"]["train"] == recipe.to_dict()["train"]
    assert session["summary"]["knn_top1"] == outcome.summary["knn_top1"]
    epochs = [r["loss"] for r in outcome.run_dir.records() if r["kind"] == "epoch"]
    assert [row["epoch/loss"] for row in session["history"] if "epoch/loss" in row] == epochs
    assert session["exit_code"] == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and f"run {recipe.fingerprint} is already logged in" in (
        again.stderr
    )
    assert len(sessions(outcome.run_dir)) == 1


def test_a_stage_logs_to_its_own_wandb_run_in_its_parents_group(tmp_path: Path) -> None:
    """A fine-tuning stage of a W&B run: its own offline W&B run (id = stage id, job type =
    its kind) in the group its parent logs to, with its summary."""
    from cltool.run import run_recipe
    from cltool.stage_run import run_stages
    from cltool.stages import plan_stages

    recipe = resolve(
        {
            "name": "tiny",
            "data": {"num_train": 256, "num_test": 64},
            "model": {"width": 8},
            "train": {"epochs": 1, "batch_size": 64},
            "eval": {"linear": False, "baselines": False},
            "wandb": {"enabled": True, "project": "cltest"},
            "stages": {"run": ["finetune"], "fractions": [0.5]},
            "finetune": {"epochs": 2},
        }
    )
    outcome = run_recipe(recipe, tmp_path, quiet=True, sweep_id="s1")
    (stage,) = plan_stages(recipe)
    (done,) = run_stages([stage], recipe, outcome.run_dir, quiet=True, group="s1")
    (session,) = sessions(done.run_dir)
    run = session["run"]
    assert (run.run_id, run.run_group, run.job_type) == (stage.stage_id, "s1", "finetune")
    assert session["config"]["parent"] == recipe.fingerprint
    assert session["summary"]["top1"] == done.summary["top1"]
    assert session["exit_code"] == 0
