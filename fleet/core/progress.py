"""Progress of long stages, on stderr: the one way fleet shows it (``fleet compress``, ``fleet synth``, ``fleet bench``).

On a terminal, a rich progress bar per stage (what it counts, done / total, elapsed, ETA). When stderr is not a
terminal (CI, ``kubectl logs``, a file), no bar is drawn: each unfinished stage is logged as one line every
:data:`LOG_SECONDS` seconds (``$FLEET_PROGRESS_SECONDS`` overrides), plus one line when it starts and one when it
ends::

    stage 1  teacher soft labels: 120/200 campaigns (60%), elapsed 0:01:02, ETA 0:00:41
    stage 2  backbone: 300/2,000 steps (15%), loss 0.0213, elapsed 0:00:31, ETA 0:02:55

Both are a :class:`rich.progress.Progress`: ``add_task(description, total=..., unit="campaigns", note="")``,
``advance``, ``update``. ``unit`` names what is counted; ``note`` is free text shown after the count (the loss).
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from fleet.core.constants import ENV_PROGRESS_SECONDS

#: Seconds between two progress lines when stderr is not a terminal.
LOG_SECONDS = 10.0


def log_seconds() -> float:
    """Seconds between two progress lines: ``$FLEET_PROGRESS_SECONDS`` when it is a positive number, else
    :data:`LOG_SECONDS`."""
    try:
        value = float(os.environ.get(ENV_PROGRESS_SECONDS, ""))
    except ValueError:
        return LOG_SECONDS
    return value if value > 0 else LOG_SECONDS


def eta_seconds(task: Task) -> float | None:
    """Seconds left at the task's mean rate since it started (what was done before it started, e.g. the shards of an
    interrupted run, does not count), or None before the first step."""
    done = task.completed - task.fields.get("initial", 0)
    if task.total is None or done <= 0 or not task.elapsed:
        return None
    return max(0.0, task.total - task.completed) * task.elapsed / done


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"ETA {_clock(0 if task.finished else eta_seconds(task))}", style="progress.remaining")


class _Progress(Progress):
    """A Progress whose tasks always carry the ``unit`` and ``note`` fields its columns show, and ``initial`` (the
    count the task started at)."""

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields,
    ) -> TaskID:
        fields.setdefault("unit", "campaigns")
        fields.setdefault("note", "")
        fields["initial"] = completed
        return super().add_task(description, start=start, total=total, completed=completed, visible=visible, **fields)


class LineProgress(_Progress):
    """The progress of a non-terminal stderr: draws nothing; logs a line per task when it starts, every
    ``every`` seconds while it runs and when it finishes (a task left unfinished, e.g. by Ctrl-C, gets no last line)."""

    def __init__(self, console: Console, every: float):
        super().__init__(console=console, disable=True)
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_final: set[TaskID] = set()
        self._log_lock = threading.Lock()

    def start(self) -> None:
        super().start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fleet-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        super().stop()

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields,
    ) -> TaskID:
        task_id = super().add_task(
            description, start=start, total=total, completed=completed, visible=visible, **fields
        )
        if visible:
            self._log(self._tasks[task_id])
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_if_finished(task_id)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log_if_finished(task_id)

    def _log_if_finished(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.finished and task.visible and task_id not in self._logged_final:
            self._log(task, final=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            for task in self.tasks:
                if task.visible and not task.finished:
                    self._log(task)

    def _log(self, task: Task, final: bool = False) -> None:
        with self._log_lock:
            if task.id in self._logged_final:
                return
            if final:
                self._logged_final.add(task.id)
            self.console.out(progress_line(task, final=final), highlight=False)


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=max(0, int(seconds))))


def progress_line(task: Task, *, final: bool = False) -> str:
    """One line: ``<description>: <done>/<total> <unit> (<percent>), [<note>, ]elapsed h:mm:ss, ETA h:mm:ss``
    (``done in h:mm:ss`` instead of the ETA when ``final``)."""
    unit = task.fields.get("unit", "")
    note = task.fields.get("note", "")
    count = f"{int(task.completed):,}"
    if task.total is not None:
        count += f"/{int(task.total):,} {unit} ({task.percentage:.0f}%)"
    else:
        count += f" {unit}"
    parts = [count] + ([note] if note else [])
    if final:
        parts.append(f"done in {_clock(task.elapsed)}")
    else:
        parts += [f"elapsed {_clock(task.elapsed)}", f"ETA {_clock(eta_seconds(task))}"]
    return f"{task.description}: {', '.join(parts)}"


def stage_progress(console: Console) -> Progress:
    """The progress display for ``console`` (stderr): a bar on a terminal, else a :class:`LineProgress` logging
    one line every :func:`log_seconds` seconds. Use as a context manager."""
    if console.is_terminal:
        return _Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            _EtaColumn(),
            console=console,
            transient=False,
        )
    return LineProgress(console, log_seconds())


__all__ = ["LOG_SECONDS", "LineProgress", "eta_seconds", "log_seconds", "progress_line", "stage_progress"]
