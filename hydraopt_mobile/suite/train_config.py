"""How the suite's adapters are trained (``TrainConfig``) and the seed each task trains with: the
settings, without the training (``train.py``), so the command line reads them without torch."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from hydraopt_mobile.errors import UserError
from hydraopt_mobile.suite.tasks import TaskSpec

INITS = ("shared-seed", "independent-seeds")
DEFAULT_STEPS: dict[str, int] = {"country": 60, "topic": 60, "currency": 60, "reply": 40}  # per application


@dataclass(frozen=True)
class TrainConfig:
    """How the suite's adapters are trained; the defaults are exactly what made the committed adapters."""

    steps: int | None = None  # None: DEFAULT_STEPS of the task's application
    batch_size: int = 8
    lr: float = 4e-3
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    init: str = "shared-seed"  # shared-seed: ``seed`` for every task; independent-seeds: one per task

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: use one of {', '.join(INITS)}")

    def settings(self, task: TaskSpec) -> dict:
        """What training ``task`` with this config records in training.json (and what a cached
        adapter must match to be reused)."""
        return {
            "steps": self.steps if self.steps is not None else DEFAULT_STEPS[task.app],
            "batch_size": self.batch_size,
            "lr": self.lr,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "seed": task_seed(self.seed, task.name, self.init),
        }


def task_seed(seed: int, task: str, init: str) -> int:
    """The seed a task trains with: ``seed`` itself (shared-seed) or one derived from the task name."""
    if init == "shared-seed":
        return seed
    if init == "independent-seeds":
        return (seed * 1_000_003 + zlib.crc32(task.encode())) % 2**31
    raise UserError(f"unknown init {init!r}; use one of {INITS}")
