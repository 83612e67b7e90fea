"""Running a study: check every run, launch what is unfinished, report what is done.

1. Every run is composed as its launch will compose it and validated (with its analysis
   overrides, and the report's) before anything is written or launched.
2. Runs still held by the scheduler are left alone: the study says so and launches nothing.
3. Unfinished runs are launched, each training and then analysing its final checkpoint in the
   same job (`train.analyze_at_end`): with `cluster=local` one after another on this machine (one
   failure does not stop the rest); with a SLURM profile as one `sparse-detr-train -m` sweep that
   skips finished runs (`hydra.sweeper.skip_finished`), through the same launcher a user's sweep
   takes. Unfinished runs resume from their own checkpoints.
4. The report (`sparse-detr-report`) of the runs that are done goes into `<study dir>/report`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sparse_detr.config import ConfigError, hydra_first_line, load_config, validate, validate_run
from sparse_detr.errors import UserError
from sparse_detr.final_analysis import check_analysis
from sparse_detr.study.config import StudyConfig, hydra_value
from sparse_detr.study.stages import REPORT_DIR, format_stages, read_plan, study_stages, write_plan
from sparse_detr.sweep.compose import compose_with_hydra, hydra_config_of, job_config, run_dir_of
from sparse_detr.sweep.validation import refuse_secrets

LOCAL_CLUSTER = "local"   # conf/cluster/local.yaml: Hydra's basic launcher, this machine


@dataclass
class PlannedRun:
    point: list[str]      # the grid's overrides of this run
    run_dir: Path

    def name(self, study: StudyConfig) -> str:
        return str(self.run_dir.relative_to(study.runs_folder))


def plan_runs(study: StudyConfig) -> list[PlannedRun]:
    """Every distinct run of the study, composed and validated as its launch will be; a ConfigError names the run."""
    runs: dict[Path, PlannedRun] = {}
    for point in study.grid_points():
        where = " ".join(point)
        try:
            config = compose_with_hydra([*point, *study.common_overrides(),
                                         f"hydra.sweep.dir={hydra_value(study.runs_folder)}"])
            run_dir = run_dir_of(config)
            with hydra_config_of(config):
                check_analysis(validate_run(job_config(config), run_dir), run_dir)
        except ConfigError as error:
            raise ConfigError(f"{error} (in the run {where})") from None
        except Exception as error:  # a misspelt group option, a wrong type: Hydra's words
            raise ConfigError(f"in the run {where}: {hydra_first_line(error)}") from None
        runs.setdefault(run_dir, PlannedRun(point, run_dir))  # the same model asked for twice is one run
    return list(runs.values())


def report_config(study: StudyConfig, run_dirs: list[Path]) -> DictConfig:
    """The `sparse-detr-report` config of the study: its overrides, these runs, into <study dir>/report."""
    import sparse_detr.report  # noqa: F401  (registers the report schema)

    try:
        cfg = load_config(list(study.report), "report")
    except Exception as error:
        raise ConfigError(f"report={list(study.report)}: {hydra_first_line(error)}") from None
    # (with no runs yet: any folder that exists, so the other values can be checked before anything runs)
    cfg.runs = [str(path) for path in run_dirs] or [str(Path.cwd())]
    cfg.output_dir = str(study.folder / REPORT_DIR)
    return cfg


def launch_locally(study: StudyConfig, runs: list[PlannedRun]) -> list[str]:
    """Train and analyse each run in turn in its own process; returns the runs whose process failed."""
    failed = []
    for number, run in enumerate(runs, 1):
        print(f"study: run {number}/{len(runs)}: {run.name(study)}", flush=True)
        command = [sys.executable, "-m", "sparse_detr.train", *run.point, *study.common_overrides(),
                   f"hydra.run.dir={hydra_value(run.run_dir)}"]
        if subprocess.run(command).returncode != 0:
            failed.append(run.name(study))
    return failed


def launch_sweep(study: StudyConfig) -> int:
    """One `sparse-detr-train -m` sweep of the whole grid that launches only unfinished runs; waits for it."""
    grid = [f"{key}={','.join(hydra_value(v) for v in values)}" for key, values in study.grid.items()]
    command = [sys.executable, "-m", "sparse_detr.train", "-m", *grid, *study.common_overrides(),
               f"hydra.sweep.dir={hydra_value(study.runs_folder)}", "hydra.sweeper.skip_finished=true"]
    return subprocess.run(command).returncode


def run_study(cfg: DictConfig, argv: list[str]) -> int:
    """Validate, launch the unfinished runs, report; returns 0 when every run is done and reported."""
    refuse_secrets([*cfg.recipe, *cfg.train_overrides])
    study: StudyConfig = validate(cfg)
    runs = plan_runs(study)
    validate(report_config(study, []))
    names = [run.name(study) for run in runs]
    previous = read_plan(study.folder) or {}
    write_plan(study.folder, {"name": study.name, "study": OmegaConf.to_container(cfg, resolve=True),
                              "runs": [{"run": run.name(study), "grid": run.point} for run in runs],
                              "commands": [*previous.get("commands", []), {"time": time.time(), "argv": argv}]})
    print(f"study {study.name}: {len(runs)} runs validated in {study.folder}", flush=True)

    stages = study_stages(study.folder, names)
    busy = [s for s in stages if s.queued or s.stage in ("training", "analysing")]
    if busy:
        raise UserError(f"{len(busy)} runs of this study are still queued or running ({', '.join(s.run for s in busy)}); "
                        f"nothing was launched; follow them with: sparse-detr-study status {study.folder}")
    todo = [run for run, stage in zip(runs, stages) if stage.stage != "done"]
    print(f"study {study.name}: {len(runs) - len(todo)} runs done, {len(todo)} to run", flush=True)
    if todo:
        if study.cluster_profile == LOCAL_CLUSTER:
            failed = launch_locally(study, todo)
            if failed:
                print(f"study: {len(failed)} runs ended with an error (their output is above): {', '.join(failed)}",
                      flush=True)
        elif launch_sweep(study) != 0:
            print("study: the sweep ended with an error (its output is above)", flush=True)

    stages = study_stages(study.folder, names)
    done = [run.run_dir for run, stage in zip(runs, stages) if stage.stage == "done"]
    if done:
        from sparse_detr.report import report

        report(report_config(study, done))
    print(format_stages(stages, study.folder), flush=True)
    return 0 if len(done) == len(runs) else 1
