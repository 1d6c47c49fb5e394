"""Progress of a request: counts per state, finished and succeeded shares (SPEC 2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from taskfleet.domain.states import FINAL_STATES, State


@dataclass(frozen=True)
class Progress:
    counts: dict[str, int]
    total: int
    finished: int
    succeeded: int

    @property
    def done(self) -> bool:
        return self.total > 0 and self.finished == self.total

    @property
    def finished_share(self) -> float:
        return self.finished / self.total if self.total else 0.0

    @property
    def succeeded_share(self) -> float:
        return self.succeeded / self.total if self.total else 0.0


def progress(counts: Mapping[State, int]) -> Progress:
    full = {s.value: int(counts.get(s, 0)) for s in State}
    total = sum(full.values())
    finished = sum(full[s.value] for s in FINAL_STATES)
    return Progress(full, total, finished, full[State.SUCCEEDED.value])
