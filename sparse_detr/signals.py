"""Signal names as `cluster.preempt_signals` spells them (USR2, TERM, ...), and back to signals.

A leaf: the config schema checks the names without importing the engine (`engine/preemption.py`
installs the handlers).
"""
from __future__ import annotations

import signal


def signal_names() -> list[str]:
    """Valid `cluster.preempt_signals` values: signal names without the SIG prefix (USR2, TERM, ...)."""
    return sorted(s.name[3:] for s in signal.Signals
                  if s.name.startswith("SIG") and not s.name.startswith("SIG_")
                  and s not in (signal.SIGKILL, signal.SIGSTOP))


def to_signal(name: str | int) -> signal.Signals:
    """`USR2`, `SIGUSR2` or 12 -> signal.SIGUSR2."""
    if isinstance(name, int):
        return signal.Signals(name)
    name = str(name).upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
