"""Composing the runs of a sweep the way Hydra's launcher will, outside Hydra's own run.

Used by the validation callback (every run checked before launch), the sbatch preview and the
sweeper in hydra_plugins/sparse_detr_sweeper (each distinct run folder launched once).
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from sparse_detr import naming  # noqa: F401  (registers ${sparse_detr.variant:}, which run folders use)
from sparse_detr.config import load_config
from sparse_detr.run_folder import analysis_is_current, training_finished

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# what conf/train.yaml selects (hydra/sweeper=distinct_runs): the basic sweeper, each distinct run launched once
DISTINCT_RUNS_SWEEPER = "hydra_plugins.sparse_detr_sweeper.distinct_runs_sweeper.DistinctRunsSweeper"


@contextlib.contextmanager
def hydra_config_of(cfg: DictConfig) -> Iterator[None]:
    """Make `${hydra:...}` resolve against `cfg` for a while (the sweep dir and subdir use it)."""
    instance = HydraConfig.instance()
    previous, readonly = instance.cfg, OmegaConf.is_readonly(cfg.hydra)
    instance.set_config(cfg)  # (makes cfg.hydra read-only)
    try:
        yield
    finally:
        instance.cfg = previous
        OmegaConf.set_readonly(cfg.hydra, readonly)


def sweep_overrides(config: DictConfig, config_loader) -> Optional[list[list[str]]]:
    """The override list of every run of the sweep, as Hydra's basic sweeper expands it
    (`hydra.sweeper.params` and the command line); None for another sweeper."""
    sweeper = config.hydra.sweeper
    if OmegaConf.select(sweeper, "_target_") not in (BASIC_SWEEPER, DISTINCT_RUNS_SWEEPER):
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=config_loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + list(task)), sweeper.max_batch_size)
    return [list(job) for batch in batches for job in batch]


def job_config(sweep_config: DictConfig) -> DictConfig:
    """What the task function gets: the composed config without its `hydra` node."""
    task = copy.deepcopy(sweep_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def run_dir_of(sweep_config: DictConfig) -> Path:
    """The run folder of one run of a sweep (`output_dir`, else hydra.sweep.dir/subdir)."""
    with hydra_config_of(sweep_config):
        if sweep_config.get("output_dir"):
            return Path(str(sweep_config.output_dir)).absolute()
        return (Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)).absolute()


def run_dirs_of_jobs(config: DictConfig, loader, jobs: Sequence[Sequence[str]],
                    skip_finished: bool = False) -> tuple[list[Path], list[bool]]:
    """The run folder each job of a sweep writes into (jobs that name the same model share one),
    and, with `skip_finished`, whether that run is finished (`run_is_finished`)."""
    configs = [loader.load_sweep_config(config, list(overrides)) for overrides in jobs]
    run_dirs = [run_dir_of(sweep_config) for sweep_config in configs]
    return run_dirs, [skip_finished and run_is_finished(job_config(c), d) for c, d in zip(configs, run_dirs)]


def run_is_finished(task: DictConfig, run_dir: Path) -> bool:
    """Nothing left to do: trained to the end and, when the run analyses itself, analysed from that end."""
    return training_finished(run_dir) and (not task.train.analyze_at_end or analysis_is_current(run_dir))


def distinct_jobs(jobs: Sequence[Sequence[str]], run_dirs: Sequence[Path],
                  finished: Sequence[bool] = ()) -> tuple[list[int], dict[int, int]]:
    """(indices of the jobs to launch: the first for each run folder that is not `finished`,
    {duplicate index: the index it repeats})."""
    first: dict[Path, int] = {}
    kept, duplicates = [], {}
    for num, run_dir in enumerate(run_dirs):
        if run_dir in first:
            duplicates[num] = first[run_dir]
        else:
            first[run_dir] = num
            if not (finished and finished[num]):
                kept.append(num)
    return kept, duplicates


def compose_with_hydra(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The config with its `hydra` node, as the launcher sees it."""
    # The job name the entry point has (`sparse-detr-train` runs the `train` module).
    return load_config([f"hydra.job.name={config_name}", *overrides], config_name, return_hydra_config=True)
