"""Hydra's basic sweeper, launching each distinct run once.

Two jobs of a `-m` sweep that name the same model get the same run folder (`sparse_detr.naming`:
`attention=sparsemax,entmax15 placement=none` is softmax twice). The basic sweeper would train
that run twice, the second time over the first; this one launches the first job of each run
folder only. `sparse_detr.sweep.ValidateSweep` has already named the duplicates and recorded the
launched runs, in this order, in the sweep's manifest.

With `hydra.sweeper.skip_finished=true` (what `sparse-detr-study` launches with), runs whose
folder says they have nothing left to do are not launched again either
(`sparse_detr.sweep.compose.run_is_finished`): a relaunch resumes the rest and redoes nothing.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override

from sparse_detr.sweep.compose import distinct_jobs, run_dirs_of_jobs


class DistinctRunsSweeper(BasicSweeper):
    """BasicSweeper whose batches hold only the first job of each run folder (same order), and
    with `skip_finished` only the runs not finished yet."""

    def __init__(self, max_batch_size: Optional[int], params: Optional[dict] = None, skip_finished: bool = False):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.skip_finished = skip_finished

    def split_arguments(self, overrides: List[Override], max_batch_size) -> List[List[List[str]]]:
        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        jobs = [job for batch in batches for job in batch]
        run_dirs, finished = run_dirs_of_jobs(self.config, self.hydra_context.config_loader, jobs, self.skip_finished)
        kept, _ = distinct_jobs(jobs, run_dirs, finished)
        return _batches([jobs[num] for num in kept], max_batch_size)


def _batches(jobs: Sequence[List[str]], max_batch_size) -> List[List[List[str]]]:
    """`jobs` in batches of at most max_batch_size (one batch when it is None or -1), as the basic sweeper."""
    size = len(jobs) if max_batch_size in (None, -1) else max_batch_size
    return [list(jobs[start:start + size]) for start in range(0, len(jobs), max(size, 1))]
