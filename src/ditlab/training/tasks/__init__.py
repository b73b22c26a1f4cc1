"""The kinds of experiment, by the name a spec's `task` field gives."""

from __future__ import annotations

from ditlab.training.tasks.autoencoder import AutoencoderTask
from ditlab.training.tasks.base import Batch, Task
from ditlab.training.tasks.distillation import DistillationTask
from ditlab.training.tasks.generation import GenerationTask
from ditlab.training.tasks.restoration import RestorationTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (GenerationTask, AutoencoderTask, RestorationTask,
                                                      DistillationTask)}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise KeyError(f"task: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["AutoencoderTask", "Batch", "DistillationTask", "GenerationTask", "RestorationTask", "TASKS", "Task",
           "task_class"]
