"""Remaining-time estimates that do not count warm-up.

tqdm's own ETA divides the elapsed time by the steps done, so the first step, where MLX compiles
the training graph (tens of seconds), makes the first estimate read hours. `Eta` measures only
steady steps: the first `warmup` steps of a process are left out, and so is time spent between
steps (validation, checkpoints), which is estimated on its own from its own measurements.
"""

from __future__ import annotations

import statistics


class Eta:
    def __init__(self, total: int, done: int = 0, warmup: int = 1):
        self.total, self.done, self.warmup = total, done, warmup
        self.steps: list[float] = []  # seconds of each step this process ran, warm-up included
        self.pauses: list[float] = []  # seconds of each recurring pause (validation), first one included

    def step(self, seconds: float) -> None:
        self.steps.append(seconds)
        self.done += 1

    def skip(self) -> None:
        """A unit done without being measured (a sweep trial finished by an earlier run)."""
        self.done += 1

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)

    def remaining(self, pauses_left: int = 0, provisional: bool = False) -> float | None:
        """Seconds left, or None while only warm-up steps have been measured (`provisional`: use
        them until a steady one is, where warm-up is a small part of a unit, as for sweep trials)."""
        steady = self.steps[self.warmup:] or (self.steps if provisional else [])
        if not steady:
            return None
        # The median ignores the odd slow step (another process on the machine, a checkpoint flush).
        seconds = statistics.median(steady) * max(self.total - self.done, 0)
        if pauses_left and self.pauses:
            # The first pause also compiles its own graph; once a later one is measured, use those.
            measured = self.pauses[1:] or self.pauses
            seconds += statistics.median(measured) * pauses_left
        return seconds

    def text(self, pauses_left: int = 0, provisional: bool = False) -> str:
        left = self.remaining(pauses_left, provisional)
        return "eta after warm-up" if left is None else f"eta {clock(left)}"


def clock(seconds: float) -> str:
    """1:02:03 / 4:05 / 0:07, like tqdm's intervals."""
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
