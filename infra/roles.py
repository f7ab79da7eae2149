"""Artifact roles that carry data, as types: one place writes and parses them (lineage stores them as text).

- `CheckpointRole(arm, seed, step)` ↔ "checkpoint:<arm>:<seed>:<step>" — a checkpoint an evaluation reads.
- `SuiteRole(name)` ↔ "heldout:<name>" — a held-out suite the data stage writes and the held-out stage reads.
- `StepRole(step)` ↔ "step-0000020" — a checkpoint the RL stage saved at that step.

Arm names match infra.spec.NAME (no ':'), so the text forms parse back unambiguously. `sql_like(column)` is the
SQL condition that selects a kind's roles in lineage queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class _Role:
    PREFIX: ClassVar[str]

    @classmethod
    def sql_like(cls, column: str) -> str:
        """SQL condition selecting roles of this kind in `column`."""
        return f"{column} LIKE '{cls.PREFIX}%'"


@dataclass(frozen=True, order=True)
class CheckpointRole(_Role):
    """A checkpoint an evaluation reads: its arm, seed and RL step (0 = the SFT start)."""

    arm: str
    seed: int
    step: int
    PREFIX: ClassVar[str] = "checkpoint:"

    def __str__(self) -> str:
        return f"{self.PREFIX}{self.arm}:{self.seed}:{self.step}"

    @classmethod
    def parse(cls, role: str) -> "CheckpointRole | None":
        """The role's parts, or None when `role` is not a checkpoint role."""
        if not role.startswith(cls.PREFIX):
            return None
        arm, seed, step = role[len(cls.PREFIX):].rsplit(":", 2)
        return cls(arm, int(seed), int(step))


@dataclass(frozen=True, order=True)
class SuiteRole(_Role):
    """A held-out suite by name (e.g. 'gsm8k', 'arith')."""

    name: str
    PREFIX: ClassVar[str] = "heldout:"

    def __str__(self) -> str:
        return f"{self.PREFIX}{self.name}"

    @classmethod
    def parse(cls, role: str) -> "SuiteRole | None":
        """The suite of a role, or None when `role` is not a suite role."""
        return cls(role[len(cls.PREFIX):]) if role.startswith(cls.PREFIX) else None


@dataclass(frozen=True, order=True)
class StepRole(_Role):
    """A checkpoint the RL stage saved at `step`."""

    step: int
    PREFIX: ClassVar[str] = "step-"

    def __str__(self) -> str:
        return f"{self.PREFIX}{self.step:07d}"

    @classmethod
    def parse(cls, role: str) -> "StepRole | None":
        """The step of a role, or None when `role` is not a step role."""
        return cls(int(role[len(cls.PREFIX):])) if role.startswith(cls.PREFIX) else None


