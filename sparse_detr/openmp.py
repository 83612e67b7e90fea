"""How long torch's OpenMP threads spin while they wait, chosen before torch loads OpenMP.

An OpenMP thread that waits for its partner spins before it sleeps (libgomp: 300000 rounds). With
the cores to themselves that is the quickest, but once another process wants a core (a second run,
a test suite, a DataLoader worker) a spinning thread holds the core its partner needs to finish.
On 2 cores shared with one other training process, the default run's step took 0.26 to 2.2 s
with the default spin, 0.14 s with 10000 rounds and 0.11 s with passive waiting (threads sleep at
once); on the idle machine 10000 rounds cost nothing and passive waiting 25%. A value set in the
environment (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is kept.
"""
from __future__ import annotations

import os

SPIN_COUNT = "10000"


def shorten_spin_waits() -> None:
    """Set GOMP_SPINCOUNT unless the waiting is configured already; call it before torch is imported."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
