"""sparse-detr-study without training: its configs, the runs a grid makes, the stage words,
the quoting of what it passes on, and the errors that stop it before anything is written."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from entry_points import one_error_line, run
from hydra.core.override_parser.overrides_parser import OverridesParser

from sparse_detr.config import ConfigError, load_config, validate
from sparse_detr.study.config import StudyConfig, hydra_list, hydra_value
from sparse_detr.study.runner import plan_runs
from sparse_detr.study.stages import stage_of
from sparse_detr.sweep.compose import distinct_jobs
from sparse_detr.sweep.status import RunStatus

STUDY = [sys.executable, "-m", "sparse_detr.study"]
MAPPINGS = ["softmax", "sparsemax", "entmax15", "alpha_entmax"]


def study_config(*overrides: str) -> StudyConfig:
    return validate(load_config(list(overrides), "study"))


def test_the_named_grids_are_what_the_study_is_for(tmp_path):
    thesis, where = study_config("study=thesis"), study_config("study=where")
    assert thesis.grid == {"attention": MAPPINGS, "placement": ["cross"], "seed": [42]}
    assert thesis.recipe == ["experiment=thesis_cross"]
    assert where.grid == {"attention": MAPPINGS, "placement": ["encoder", "decoder", "cross", "all"], "seed": [42, 1, 2]}
    assert study_config().name == "shapes"   # the default: the study this machine can run
    assert study_config("study=smoke").folder == Path("outputs/studies/smoke").absolute()


def test_a_grid_makes_one_run_per_distinct_model_named_as_a_sweep_names_it(tmp_path):
    study = study_config("study=smoke", f"dir={tmp_path}", "grid.placement=[cross,encoder]", "grid.seed=[0,1]")
    names = [run.name(study) for run in plan_runs(study)]
    # softmax in the cross-attention or the encoder is one model, the baseline: one run per seed
    assert names == ["softmax-none-tiny-shapes/seed_0", "softmax-none-tiny-shapes/seed_1",
                     "sparsemax-cross-tiny-shapes/seed_0", "sparsemax-cross-tiny-shapes/seed_1",
                     "sparsemax-encoder-tiny-shapes/seed_0", "sparsemax-encoder-tiny-shapes/seed_1"]
    assert not any(tmp_path.iterdir())   # planning writes nothing


def test_where_and_thesis_grids_plan_39_and_4_runs(monkeypatch, tmp_path):
    for part in ("train2017", "val2017", "annotations"):
        (tmp_path / "coco" / part).mkdir(parents=True)
    monkeypatch.setenv("COCO_ROOT", str(tmp_path / "coco"))
    where = plan_runs(study_config("study=where", f"dir={tmp_path}"))
    assert len(where) == 4 * 4 * 3 - 3 * 3   # softmax is one model at every placement
    assert {run.run_dir.parent.name for run in plan_runs(study_config("study=thesis", f"dir={tmp_path}"))} == \
        {"softmax-none-resnet50-coco", "sparsemax-cross-resnet50-coco", "entmax15-cross-resnet50-coco",
         "alpha_entmax-cross-resnet50-coco"}


@pytest.mark.parametrize("overrides, named", [
    (["cluster=nosuch"], "nosuch"),
    (["+grid.output_dir=[x]"], "output_dir"),
    (["grid.seed=[]"], "grid="),
    (["grid.attention=[softmax,nosuch]"], "nosuch"),
    (['train_overrides=["schedule.epochs=0"]'], "schedule.epochs=0 is out of range"),
    (['analysis=["threshold=-1"]'], "threshold=-1.0 is out of range"),
    (['report=["dpi=1"]'], "dpi=1 is out of range"),
    (['analysis=["treshold=0"]'], "Could not override 'treshold'"),
    (['report=["dpii=1"]'], "Could not override 'dpii'"),
    (['train_overrides=["attention=nosuch"]'], "attention/nosuch"),
    (["name=a/b"], "a/b"),
])
def test_bad_input_stops_the_study_with_one_line_before_anything_is_written(tmp_path, overrides, named):
    result = run([*STUDY, "study=smoke", f"dir={tmp_path}/study", *overrides], cwd=tmp_path)
    assert named in one_error_line(result)
    assert not (tmp_path / "study").exists()


def test_a_secret_on_the_command_line_stops_the_study(tmp_path):
    result = run([*STUDY, "study=smoke", f"dir={tmp_path}/study", 'train_overrides=["+logger.api_key=abc"]'], cwd=tmp_path)
    line = one_error_line(result)
    assert "logger.api_key looks like a secret" in line and "abc" not in line and not (tmp_path / "study").exists()


def test_status_of_a_folder_that_is_not_a_study_is_an_error(tmp_path):
    assert str(tmp_path) in one_error_line(run([*STUDY, "status", str(tmp_path)], cwd=tmp_path))


@pytest.mark.parametrize("value", ["softmax", "a,b", "x=1", "it's", "/p/a+b=c,d/seed_0", "[0,1]"])
def test_values_passed_on_reach_hydra_unchanged(value):
    (override,) = OverridesParser.create().parse_overrides([f"key={hydra_value(value)}"])
    assert override.value() == value
    (listed,) = OverridesParser.create().parse_overrides([f"key={hydra_list([value, 'figures.images=[0]'])}"])
    assert listed.value() == [value, "figures.images=[0]"]


def status(state: str, scheduler: str = "") -> RunStatus:
    return RunStatus(run="r", state=state, scheduler=scheduler)


@pytest.mark.parametrize("run_status, in_use, trained, analysed, stage", [
    (None, False, False, False, "pending"),
    (status("pending", "PENDING"), False, False, False, "pending"),
    (status("running", "RUNNING"), False, False, False, "training"),
    (None, True, False, False, "training"),                 # a local process holds the run folder
    (status("done"), True, True, False, "analysing"),       # trained; its job is analysing now
    (status("running", "RUNNING"), False, True, False, "analysing"),
    (status("done"), False, True, True, "done"),
    (status("done"), False, True, False, "stopped"),        # trained, analysis missing: a relaunch analyses
    (status("stopped"), False, False, False, "stopped"),
    (status("running"), False, False, False, "stopped"),    # fresh files, no process holds the folder
    (status("failed", "FAILED"), False, False, False, "failed"),
])
def test_stage_words(run_status, in_use, trained, analysed, stage):
    assert stage_of(run_status, in_use=in_use, trained=trained, analysed=analysed) == stage


def test_finished_runs_are_not_launched_again_and_duplicates_still_point_at_their_first():
    jobs = [["a=1"], ["a=2"], ["a=3"], ["a=2b"]]
    run_dirs = [Path("r1"), Path("r2"), Path("r3"), Path("r2")]
    assert distinct_jobs(jobs, run_dirs) == ([0, 1, 2], {3: 1})
    assert distinct_jobs(jobs, run_dirs, [False, True, False, True]) == ([0, 2], {3: 1})


def test_a_study_config_rejects_the_keys_it_sets_itself():
    with pytest.raises(ConfigError, match="train.analyze_at_end"):
        StudyConfig(name="x", grid={"seed": [0]}, cluster={"name": "local"}, train_overrides=["train.analyze_at_end=false"])


def test_the_readme_study_commands_compose():
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = [line.split("#")[0] for line in readme.splitlines() if line.startswith("sparse-detr-study study=")]
    assert len(commands) >= 4
    for command in commands:
        study = study_config(*shlex.split(command)[1:])
        assert study.grid and study.cluster_profile, command
