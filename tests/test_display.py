"""What a run shows on a terminal: the phases without steps, the stop notice, the rate.

The terminal is rich's own rendering into a buffer (``force_terminal``): the same control codes
a user's terminal receives, read back as lines.
"""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path

import pytest
from helpers import MOCO, TINY
from rich.console import Console

from cltool.cli_common import stop_announcer, stop_notice
from cltool.display import Display
from cltool.recipe import load_recipe
from cltool.run import Interrupted, run_recipe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal() -> tuple[Console, io.StringIO]:
    screen = io.StringIO()
    return Console(file=screen, force_terminal=True, width=120), screen


def screen_lines(screen: io.StringIO) -> list[str]:
    """The text of every line drawn, control codes removed (``\\r`` starts a redraw)."""
    return [line.strip() for line in re.split(r"[\r\n]", ANSI.sub("", screen.getvalue()))]


def test_baselines_phase_says_what_it_computes(tmp_path: Path) -> None:
    """Before training the bar is not up yet for 20-35 s on the default recipe: a spinner line
    names the baselines instead of an empty ``epoch - 0/N`` bar."""
    console, screen = terminal()
    recipe = load_recipe(MOCO, [*TINY, "eval.baselines=true"])
    run_recipe(recipe, tmp_path, console=console)
    lines = screen_lines(screen)
    assert any("computing baselines (random encoder, raw pixels)" in line for line in lines)
    assert "computing baselines (random encoder, raw pixels): done" in lines
    assert not any(re.match(r"epoch -", line) for line in lines)


def test_stop_notice_has_a_line_of_its_own_above_the_bar() -> None:
    console, screen = terminal()
    display = Display(console, log_path=None)
    display.start(total_steps=10, done_steps=0, epoch=0)
    display.update(3, 0, {"loss": 1.0, "imgs_per_s": 100.0})
    stop_announcer(console)(signal.SIGINT)
    display.update(4, 0, {"loss": 1.0, "imgs_per_s": 100.0})
    display.finish()
    assert stop_notice(signal.SIGINT) in screen_lines(screen)
    notice = "SIGINT: stopping after this step (Ctrl-C again to abort now)"
    assert stop_notice(signal.SIGINT) == notice


def test_resume_at_an_epochs_last_step_reports_no_zero_rate(tmp_path: Path) -> None:
    """Stopped after the last step of epoch 1 (4 steps of 64 images), the resumed process runs
    none of that epoch's steps: its rate is unknown, not 0 img/s."""
    recipe = load_recipe(MOCO, [*TINY, "train.epochs=2"])
    polls = iter(range(1, 100))
    with pytest.raises(Interrupted):
        run_recipe(recipe, tmp_path, quiet=True, should_stop=lambda: next(polls) == 4)
    console, screen = terminal()
    outcome = run_recipe(recipe, tmp_path, console=console)
    epochs = [r for r in outcome.run_dir.records() if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert "imgs_per_s" not in epochs[0]
    assert epochs[1]["imgs_per_s"] > 0
    assert not any(" 0 img/s" in line for line in screen_lines(screen))
