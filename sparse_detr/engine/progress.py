"""A one-line progress display (count, rate, loss) on a terminal; silent in logs and batch jobs."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, mode: str = "auto", stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.enabled = mode == "on" or (mode == "auto" and stream.isatty())
        self.count, self.start = 0, time.perf_counter()

    def update(self, **values: float) -> None:
        self.count += 1
        if not self.enabled:
            return
        rate = self.count / max(time.perf_counter() - self.start, 1e-9)
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.stream.write(f"\r{self.label} [{self.count}/{self.total}] {rate:.2f} it/s {shown}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
