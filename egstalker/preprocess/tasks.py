"""The contract between the preprocessing runner and its nine tasks.

A task is a function `run(ctx: TaskContext) -> None`. It reads earlier tasks' outputs from `ctx.dataset`
and writes its own outputs into `ctx.staging` under the same relative names (e.g.
`ctx.staging.parsing(7)`); the runner moves them into the dataset only when the task returns, and records
the task as complete in meta.json. So an interrupted or failed task leaves nothing half-written, and a
re-run resumes from the first incomplete task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from egstalker.dataset.layout import DatasetLayout
from egstalker.preprocess.config import PreprocessConfig


@dataclass
class TaskContext:
    dataset: DatasetLayout
    """The dataset being built: outputs of completed tasks are here."""
    staging: DatasetLayout
    """A temporary folder with the same layout: write this task's outputs here."""
    config: PreprocessConfig
    meta: dict[str, Any]
    """Dataset metadata (meta.json); a task may add keys (e.g. 'n_frames', 'audio_features', 'tracking')."""
    video_path: str
    show_progress: bool = True
    revision_reached: int | None = None
    """Set by a task that had to leave out a fix (say, a model it could not get): the revision its outputs match,
    recorded instead of the task's own, so the next run tries the task again and datasets read as outdated."""


@dataclass(frozen=True)
class Task:
    number: int
    name: str
    run: Callable[[TaskContext], None]
    outputs: Callable[[DatasetLayout, dict], list] = field(default=lambda layout, meta: [])
    """Paths that must exist for the task to count as complete (checked besides meta.json)."""
    revision: int = 1
    """Raised when a fix changes what the task writes: a dataset whose outputs come from an older revision
    (meta.json "task_revisions"; none recorded means 1) redoes the task, and what read it, on its next run."""
