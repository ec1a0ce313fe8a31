"""Progress on stderr (fleet.core.progress): a bar on a terminal, one line every N seconds elsewhere (CI, kubectl logs)."""

import io
import re
import time

from rich.console import Console

from fleet.core.progress import (
    LOG_SECONDS,
    LineProgress,
    eta_seconds,
    log_seconds,
    stage_progress,
)


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=200), out


def test_a_terminal_gets_a_bar_anything_else_lines():
    terminal, _ = _console(True)
    pipe, _ = _console(False)
    assert not isinstance(stage_progress(terminal), LineProgress)
    assert isinstance(stage_progress(pipe), LineProgress)


def test_log_seconds_default_and_override(monkeypatch):
    monkeypatch.delenv("FLEET_PROGRESS_SECONDS", raising=False)
    assert log_seconds() == LOG_SECONDS == 10.0
    monkeypatch.setenv("FLEET_PROGRESS_SECONDS", "2.5")
    assert log_seconds() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("FLEET_PROGRESS_SECONDS", bad)
        assert log_seconds() == LOG_SECONDS


def test_lines_at_start_every_n_seconds_and_at_the_end(monkeypatch):
    monkeypatch.setenv("FLEET_PROGRESS_SECONDS", "0.2")
    console, out = _console(False)
    with stage_progress(console) as progress:
        task = progress.add_task("stage 1  teacher soft labels", total=20, completed=5)  # 5 done by an earlier run
        time.sleep(0.3)
        progress.advance(task, 5)
        time.sleep(0.6)  # periodic lines
        progress.advance(task, 10)
        steps = progress.add_task("stage 2  backbone", total=2000, unit="steps")
        progress.update(steps, completed=300, note="loss 0.0213")
    lines = out.getvalue().splitlines()
    stage1 = [line for line in lines if line.startswith("stage 1")]
    assert stage1[0] == "stage 1  teacher soft labels: 5/20 campaigns (25%), elapsed 0:00:00, ETA -:--:--"
    # every 0.2 s while it runs; the ETA counts this run's rate only (5 campaigns in ~0.3 s, not 10)
    assert any(
        re.fullmatch(r"stage 1  teacher soft labels: 10/20 campaigns \(50%\), elapsed 0:00:0\d, ETA 0:00:0\d", line)
        for line in stage1[1:-1]
    )
    assert len(stage1) >= 3 and re.fullmatch(
        r"stage 1  teacher soft labels: 20/20 campaigns \(100%\), done in 0:00:0\d", stage1[-1]
    )
    # an unfinished task (the run was interrupted) gets no last line; what it logged is the start line
    assert [line for line in lines if line.startswith("stage 2")] == [
        "stage 2  backbone: 0/2,000 steps (0%), elapsed 0:00:00, ETA -:--:--"
    ]


def test_eta_counts_from_where_the_task_started():
    console, _ = _console(False)
    progress = LineProgress(console, every=60)
    task_id = progress.add_task("x", total=100, completed=50)
    task = progress.tasks[0]
    assert eta_seconds(task) is None  # nothing done yet in this run
    progress.advance(task_id, 10)
    before = task.elapsed
    eta = eta_seconds(task)
    after = task.elapsed
    assert 40 * before / 10 <= eta <= 40 * after / 10  # 40 left at 10 per elapsed time: not at 60 per elapsed time
