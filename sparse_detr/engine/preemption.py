"""Checkpoint, then requeue, when SLURM signals a run before its time limit or preempts it.

A SLURM job launched through submitit (`cluster=berzelius`, `cluster=rpl`, `cluster=local_slurm`)
gets SIGUSR2 `signal_delay_s` seconds before its time limit (`sbatch --signal=USR2@...`), and on
preemption. submitit's own handler requeues the job at once, wherever the training is, so every
step since the last checkpoint would be lost. `PreemptionGuard` puts itself in front of it:

1. its handler only records the signal (nothing else is safe inside a signal handler);
2. the trainer asks `requested()` after every optimizer step (all ranks agree through one
   all-reduce), saves its checkpoint, and calls `stop()`;
3. `stop()` hands the signal to the handler that was installed before (submitit's: it requeues
   the job with `scontrol requeue` and exits); the requeued job runs the same call again, and the
   trainer resumes from the run folder's checkpoint with the same tracking run.

Outside submitit there is no previous handler: the guard exits after saving, saying how to resume.
Ranks other than 0, whose submitit handler returns without exiting, exit the same way.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable, Iterable, NoReturn, Optional

from sparse_detr.signals import to_signal

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("USR2",)


class PreemptionGuard:
    """Records the preemption signals and defers acting on them to a safe point of the training."""

    def __init__(self, signals: Iterable[str | int] = DEFAULT_SIGNALS):
        self.signals = [to_signal(s) for s in signals]
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, object] = {}

    # -- signal side ---------------------------------------------------------------------------
    def install(self) -> "PreemptionGuard":
        """Take over the signals, remembering the handlers in place (submitit's). Main thread only:
        elsewhere Python cannot install handlers, and the guard stays inactive."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption guard not installed: not in the main thread")
            return self
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers that were there before `install()`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._record:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def previous_handler(self, sig: signal.Signals | None = None) -> Optional[Callable]:
        """The handler that was in place before, if it is a Python callable (not SIG_DFL/SIG_IGN)."""
        previous = self._previous.get(sig or self.received)
        return previous if callable(previous) else None

    # -- training side -------------------------------------------------------------------------
    def requested(self, ctx=None) -> bool:
        """Whether a preemption signal came (on any rank, when `ctx` is a distributed context).

        With several processes every rank must take the same decision, since saving gathers
        every rank's random streams: one all-reduce of a flag per step."""
        flag = self.received is not None
        if ctx is not None and getattr(ctx, "enabled", False):
            import torch
            import torch.distributed as dist

            tensor = torch.tensor([int(self.received or 0)], device=ctx.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            if tensor.item() and self.received is None:
                self.received = signal.Signals(int(tensor.item()))
            flag = bool(tensor.item())
        return flag

    def stop(self, save: Callable[[], object], where: str = "", checkpoint: str = "") -> NoReturn:
        """Save, then hand the signal to the previous handler (submitit: requeue and exit); if it
        returns, or there is none, exit here.

        `save` must leave nothing to do after it: `scontrol requeue` ends every process of the job
        at once (the W&B service among them), so the trainer also finishes its tracker there."""
        sig = self.received or self.signals[0]
        save()
        previous = self.previous_handler(sig)
        at = f" at {where}" if where else ""
        saved = f" to {checkpoint}" if checkpoint else ""
        if previous is not None:
            log.warning("received %s%s: checkpoint saved%s; handing over to the job's handler (requeue)",
                        sig.name, at, saved)
            previous(int(sig), None)  # submitit's checkpoint_and_try_requeue: scontrol requeue + sys.exit
            message = f"received {sig.name}{at}: checkpoint saved{saved}; exiting (the job is requeued by rank 0)"
        else:
            message = (f"received {sig.name}{at}: checkpoint saved{saved}; stopping. "
                       f"Start the same command again to resume from it.")
        print(f"sparse-detr: {message}", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(sig))
