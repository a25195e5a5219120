"""Weights & Biases for runs: a metric sink that never stops training, and ``cl sync``.

The run folder is the source of truth; W&B is a copy. :func:`open_wandb` starts (or, for a
resumed run, continues: same id, ``resume="allow"``) the W&B run whose id and name are the run
id, whose group is the sweep id, job type the method and tags the swept values (``m=0.99``),
with the resolved recipe as config. Each run writes under its own folder (``<run>/wandb/``), so
runs never race on W&B's shared ``latest-run`` link; W&B's cache and debug logs go to
``<out>/.wandb-cache`` instead of the home folder (unless ``WANDB_CACHE_DIR`` is set).

Mode ``auto`` is online only when an API key is configured (``WANDB_API_KEY`` or a netrc entry
for the W&B host) and ``WANDB_MODE`` does not say otherwise; an online start that fails (no
network: compute nodes often have none) falls back to offline after at most
:data:`INIT_TIMEOUT_S`, saying so in one line. Any W&B error while logging is reported once
and swallowed. :func:`sync_offline` uploads offline runs later, from a machine with network.
"""

from __future__ import annotations

import netrc
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cltool.errors import CLToolError, InputError
from cltool.recipe import SHORT_NAMES, Recipe
from cltool.runstate import PRUNED
from cltool.track import DONE, INTERRUPTED, RunDir

#: Longest wait for an online start before falling back to offline.
INIT_TIMEOUT_S = 30.0
#: Longest wait for a TCP connection to the W&B host, the quick test for "no network".
CONNECT_TIMEOUT_S = 5.0
#: W&B refuses tags longer than this.
MAX_TAG_LEN = 64
#: Fields of every record that are the x axes, not metrics.
AXES = ("epoch", "global_step")

Echo = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B host opens.

    Without network W&B's own start retries until its init timeout; this fails in seconds.
    Behind a proxy a direct connection proves nothing, so W&B is left to try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def has_api_key() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY`` or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url()).hostname or ""
    path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def choose_mode(mode: str) -> str:
    """``online`` or ``offline`` for a recipe's ``wandb.mode`` (``auto`` decides here)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return "offline"
    return "online" if has_api_key() else "offline"


def swept_tags(swept: dict[str, Any] | None) -> list[str]:
    """``{"key_encoder.m": 0.99}`` -> ``["m=0.99"]``: what a sweep varied, as W&B tags."""
    short = {dotted: name for name, dotted in SHORT_NAMES.items()}
    return [f"{short.get(k, k)}={v}"[:MAX_TAG_LEN] for k, v in (swept or {}).items()]


def init_kwargs(
    recipe: Recipe, run_dir: RunDir, sweep_id: str | None, swept: dict[str, Any] | None
) -> dict[str, Any]:
    """Everything ``wandb.init`` gets except the mode and the settings."""
    cfg = recipe.wandb
    tags = list(dict.fromkeys([*cfg.tags, *swept_tags(swept)]))
    return {
        "project": cfg.project,
        "entity": cfg.entity or None,
        "id": recipe.fingerprint,
        "name": recipe.fingerprint,
        "group": sweep_id,
        "job_type": recipe.method,
        "tags": tags,
        "config": recipe.to_dict(),
        "dir": str(run_dir.path),
        "resume": "allow",
    }


def history_row(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record as a W&B row: ``{"kind": "step", "loss": 1}`` -> ``step/loss``."""
    kind = record.get("kind", "step")
    row = {k: record[k] for k in AXES if k in record}
    for key, value in record.items():
        if key not in ("kind", *AXES) and isinstance(value, int | float):
            row[f"{kind}/{key}"] = value
    return row


class WandbSink:
    """A :class:`~cltool.track.MetricSink` over one W&B run; W&B errors never reach training."""

    def __init__(self, run: Any, echo: Echo) -> None:
        self.run = run
        self.echo = echo
        self.reported = False

    def _failed(self, what: str, err: Exception) -> None:
        if not self.reported:
            self.reported = True
            self.echo(
                f"W&B: {what} failed ({type(err).__name__}: {err}); training goes on, "
                "the run folder keeps every metric"
            )

    def log(self, record: dict[str, Any]) -> None:
        try:
            self.run.log(history_row(record))
        except Exception as err:  # W&B must never stop training
            self._failed("logging", err)

    def finish(self, summary: dict[str, Any] | None, status: str) -> None:
        try:
            self.run.summary["status"] = status
            if summary:
                self.run.summary.update(summary)
            if status == INTERRUPTED:
                self.run.mark_preempting()
            self.run.finish(exit_code=0 if status in (DONE, PRUNED) else 1)
        except Exception as err:  # W&B must never stop training
            self._failed("finishing the run", err)
        import wandb

        _teardown(wandb)


def _start(wandb: Any, kwargs: dict[str, Any], mode: str) -> Any:
    settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off", silent=True)
    run = wandb.init(mode=mode, settings=settings, **kwargs)
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


def _teardown(wandb: Any) -> None:
    """Stop W&B's service, which completes the run's offline files before it returns.

    ``run.finish()`` can return before the ``.wandb`` file is written, and a service that
    failed to start a run keeps its id taken: the next run of this process (a resume, the next
    run of a local sweep) would lose its records or fail to start. A fresh service costs
    half a second per run.
    """
    try:
        wandb.teardown()
    except Exception:  # a broken service is what we are leaving behind anyway
        return


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_wandb(
    recipe: Recipe,
    run_dir: RunDir,
    sweep_id: str | None = None,
    swept: dict[str, Any] | None = None,
    echo: Echo | None = None,
    init: dict[str, Any] | None = None,
) -> WandbSink | None:
    """The W&B sink of a run starting or resuming, or None when W&B is off or cannot start;
    ``init`` replaces ``wandb.init`` arguments (a stage: its own id, config and job type in its
    parent's group)."""
    if not recipe.wandb.enabled:
        return None
    echo = echo or _stderr
    try:
        import wandb
    except ImportError:
        echo("W&B: the wandb package is not installed; logging to the run folder only")
        return None
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir.path.parent.parent / ".wandb-cache"))
    kwargs = init_kwargs(recipe, run_dir, sweep_id, swept) | (init or {})
    mode = choose_mode(recipe.wandb.mode)
    offline_note = f"upload later with `cl sync {run_dir.path}`"
    if mode == "online" and not reachable(base_url()):
        reason = f"cannot reach {base_url()}"
    else:
        try:
            run = _start(wandb, kwargs, mode)
            if mode == "offline":
                echo(f"W&B: logging offline to {run_dir.path / 'wandb'}; {offline_note}")
            return WandbSink(run, echo)
        except Exception as err:
            if mode == "offline":
                echo(f"W&B: off for this run, offline start failed ({_first_line(err)})")
                return None
            reason = _first_line(err)
            _teardown(wandb)
    try:
        run = _start(wandb, kwargs, "offline")
    except Exception as err:
        echo(f"W&B: off for this run, online ({reason}) and offline start failed ({err})")
        return None
    echo(f"W&B: online start failed ({reason}); logging offline, {offline_note}")
    return WandbSink(run, echo)


def logged_wandb_run(run_dir: RunDir) -> Path | None:
    """The W&B run folder a run already wrote (``<run>/wandb/[offline-]run-<time>-<id>``)."""
    found = sorted((run_dir.path / "wandb").glob(f"*run-*-{run_dir.path.name}"))
    return found[-1] if found else None


def log_finished_run(recipe: Recipe, run_dir: RunDir, echo: Echo = _stderr) -> None:
    """Send a run that finished without W&B to W&B from its folder, in one go: its config,
    every ``metrics.jsonl`` record and its summary (offline when there is no network)."""
    logged = logged_wandb_run(run_dir)
    if logged is not None:
        echo(
            f"W&B: run {run_dir.path.name} is already logged in {logged}; "
            f"`cl sync {run_dir.path}` uploads it if it was logged offline"
        )
        return
    sink = open_wandb(recipe, run_dir, echo=echo)
    if sink is None:
        return
    records = run_dir.records()
    for record in records:
        sink.log(record)
    sink.finish(run_dir.summary(), DONE)
    echo(f"W&B: logged run {run_dir.path.name} from its folder ({len(records)} records, summary)")


# ---------------------------------------------------------------------------------------------
# cl sync


def unsynced_runs(path: Path) -> list[Path]:
    """Offline W&B run folders at or below ``path`` whose ``.wandb`` file has no sync marker."""
    path = Path(path)
    folders = [path] if path.name.startswith("offline-run-") else path.rglob("offline-run-*")
    found = []
    for folder in folders:
        logs = sorted(folder.glob("run-*.wandb")) if folder.is_dir() else []
        if logs and not logs[0].with_suffix(".wandb.synced").exists():
            found.append(folder)
    return sorted(found)


def _run_cli(args: list[str], timeout: float) -> tuple[int | None, str]:
    """Run the wandb CLI in its own process group; on timeout kill the group (its service too)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wandb", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, ""


def sync_offline(path: Path, timeout: float = 600.0, echo: Echo = _stderr) -> int:
    """Upload every unsynced offline run below ``path``; the number uploaded.

    Stops at the first failure with a one-line :class:`CLToolError` naming the run and the fix,
    so that a machine with no network fails once, after at most ``timeout`` seconds.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such folder")
    pending = unsynced_runs(path)
    if pending and not has_api_key():  # the upload fails (1), as without network
        raise CLToolError(
            f"cannot sync {pending[0]}: no W&B API key; run `wandb login` (or set "
            f"WANDB_API_KEY) on a machine with network, then `cl sync {path}`"
        )
    if pending and not reachable(base_url()):
        raise CLToolError(
            f"cannot sync {pending[0]}: cannot reach {base_url()} (no network?); rerun "
            f"`cl sync {path}` on a machine that can reach it"
        )
    for done, folder in enumerate(pending):
        echo(f"syncing {folder}")
        code, output = _run_cli(["sync", str(folder)], timeout)
        if code is None:
            raise CLToolError(
                f"cannot sync {folder}: W&B did not answer within {timeout:.0f} s ({done} "
                f"synced); check the network or WANDB_BASE_URL, then rerun `cl sync {path}`"
            )
        if code != 0:
            last = next((ln for ln in reversed(output.splitlines()) if ln.strip()), "")
            raise CLToolError(
                f"cannot sync {folder}: wandb sync exited {code} ({last.strip()}); "
                f"fix that, then rerun `cl sync {path}`"
            )
    return len(pending)
