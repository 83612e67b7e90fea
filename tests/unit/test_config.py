"""The Hydra config: every option composes and validates, bad values stop before any work or any
submission (naming the key, the value and the choices), the cluster profiles produce the sbatch
lines their clusters need, and the console scripts find `conf/` from anywhere, installed or not."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_detr.config import ConfigError, config_dir, load_config, validate
from sparse_detr.sweep.compose import compose_with_hydra
from sparse_detr.sweep.slurm import sbatch_script, submitit_executor

REPO = Path(__file__).resolve().parents[2]
GROUPS = ["backbone", "attention", "placement", "data", "optim", "schedule", "logger", "cluster", "experiment"]
# What a data set needs from the user (paths); validation only checks that they are given.
DATA_NEEDS = {
    "coco": ["data.root=/data/coco"],
    "coco_format": ["data.train_images=/d/train", "data.train_annotations=/d/train.json",
                    "data.val_images=/d/val", "data.val_annotations=/d/val.json"],
}
CLUSTER_ENV = ("SPARSE_DETR_ACCOUNT", "SPARSE_DETR_PARTITION", "SPARSE_DETR_GPU_TYPE", "SPARSE_DETR_SETUP")


@pytest.fixture(autouse=True)
def clean_cluster_env(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose_valid(*overrides: str):
    cfg = load_config(list(overrides))
    needs = DATA_NEEDS.get(cfg.data.name, [])
    if needs:
        cfg = load_config([*overrides, *needs])
    return validate(cfg)


def test_every_group_has_its_options():
    assert set(GROUPS) <= {p.name for p in config_dir().iterdir() if p.is_dir()}
    assert options("cluster") == ["berzelius", "local", "local_slurm", "rpl"]
    assert {"smoke", "shapes_demo", "detr_r50_coco", "detr_r18_coco"} <= set(options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    base = [] if group == "experiment" else ["experiment=smoke"]
    config = compose_valid(*base, f"{group}={option}")
    if group in ("backbone", "attention", "placement", "data", "logger"):
        assert getattr(config, group).name == option
    if group == "cluster":
        assert config.cluster.name == option and config.cluster.preempt_signals == ["USR2"]


def test_the_default_config_is_the_local_cluster():
    cfg = compose_with_hydra([])
    assert cfg.cluster.name == "local"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "basic"
    assert cfg.hydra.callbacks.validate_sweep._target_ == "sparse_detr.sweep.ValidateSweep"


def test_the_sweep_folder_resolves_before_hydras_runtime_is_set():
    """The sweeper and the launcher read hydra.sweep.dir before `${hydra:...}` works."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_with_hydra(["experiment=smoke"])
    instance = HydraConfig.instance()
    previous, instance.cfg = instance.cfg, None
    try:
        assert OmegaConf.select(cfg, "hydra.sweep.dir") == "outputs/sweeps/smoke"
    finally:
        instance.cfg = previous


@pytest.mark.parametrize("override,key,value,valid", [
    ("attention.alpha=2.5", "attention.alpha", "2.5", "(1.0, 2.0]"),
    ("attention.impl=fastest", "attention.impl", "'fastest'", "fast, eager, reference"),
    ("train.device=gpu", "train.device", "'gpu'", "auto, cpu, cuda"),
    ("train.amp=fp8", "train.amp", "'fp8'", "none, bf16, fp16"),
    ("placement.cross=sparsmax", "placement.cross", "'sparsmax'", "softmax, sparsemax, entmax15, alpha_entmax"),
    ("model.position_embedding=rope", "model.position_embedding", "'rope'", "sine, learned"),
    ("model.position_temperature=1", "model.position_temperature", "1", "(1.0, inf)"),
    ("cluster.preempt_signals=[USR9]", "cluster.preempt_signals", "'USR9'", "USR2"),
])
def test_a_bad_value_names_the_key_the_value_and_the_choices(override, key, value, valid):
    with pytest.raises(ConfigError) as error:
        validate(load_config(["experiment=smoke", override]))
    message = str(error.value)
    assert f"{key}={value}" in message and valid in message


def test_a_misspelt_group_option_lists_the_valid_ones():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        load_config(["cluster=berzelus"])
    message = str(error.value)
    assert "cluster/berzelus" in message
    for option in ("berzelius", "local", "local_slurm", "rpl"):
        assert option in message


# ------------------------------------------------------------------------------ cluster profiles

def sbatch_lines(*overrides: str, jobs: int = 1) -> list[str]:
    return [line for line in sbatch_script(list(overrides), jobs).splitlines() if line.startswith("#SBATCH")]


def test_berzelius_asks_for_whole_a100s_by_count_with_the_users_account(monkeypatch):
    monkeypatch.setenv("SPARSE_DETR_ACCOUNT", "berzelius-2025-123")
    monkeypatch.setenv("SPARSE_DETR_SETUP", "module load Mambaforge/23.3.1-1-hpc1-bdist && mamba activate sd")
    script = sbatch_script(["cluster=berzelius"])
    lines = sbatch_lines("cluster=berzelius")
    for expected in ("--account=berzelius-2025-123", "--gpus=8", "--constraint=thin", "--ntasks-per-node=8",
                     "--cpus-per-task=16", "--time=4320", "--nodes=1", "--signal=USR2@600"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    assert not any(line.startswith(("#SBATCH --mem", "#SBATCH --gpus-per-node", "#SBATCH --gres",
                                    "#SBATCH --partition")) for line in lines), lines
    assert "module load Mambaforge/23.3.1-1-hpc1-bdist && mamba activate sd" in script.split("# setup")[1]


def test_berzelius_fat_nodes_several_nodes_and_a_partition_come_from_the_user(monkeypatch):
    monkeypatch.setenv("SPARSE_DETR_ACCOUNT", "berzelius-2025-123")
    monkeypatch.setenv("SPARSE_DETR_GPU_TYPE", "fat")
    lines = sbatch_lines("cluster=berzelius", "hydra.launcher.nodes=2")
    assert "#SBATCH --constraint=fat" in lines and "#SBATCH --gpus=16" in lines and "#SBATCH --nodes=2" in lines
    lines = sbatch_lines("cluster=berzelius", "hydra.launcher.tasks_per_node=4", "hydra.launcher.partition=berzelius")
    assert "#SBATCH --gpus=4" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert "#SBATCH --partition=berzelius" in lines


def test_berzelius_without_an_account_says_which_variable_to_set():
    with pytest.raises(Exception, match="SPARSE_DETR_ACCOUNT"):
        sbatch_script(["cluster=berzelius"])


def test_rpl_asks_for_one_12gb_gpu_8_cpus_and_32gb(monkeypatch):
    monkeypatch.setenv("SPARSE_DETR_PARTITION", "gpu")
    monkeypatch.setenv("SPARSE_DETR_SETUP", "source ~/venvs/sd/bin/activate")
    lines = sbatch_lines("cluster=rpl", jobs=3)
    for expected in ("--partition=gpu", "--gres=gpu:1", "--cpus-per-task=8", "--mem=32GB", "--ntasks-per-node=1",
                     "--array=0-2%3"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    assert not any(line.startswith(("#SBATCH --gpus", "#SBATCH --account")) for line in lines), lines
    assert "source ~/venvs/sd/bin/activate" in sbatch_script(["cluster=rpl"])
    monkeypatch.setenv("SPARSE_DETR_ACCOUNT", "rpl")
    assert "#SBATCH --account=rpl" in sbatch_lines("cluster=rpl")


def test_rpl_recipes_use_resnet18_or_34():
    config = compose_valid("experiment=detr_r18_coco", "cluster=rpl")
    assert config.backbone.name == "resnet18" and config.data.name == "coco" and config.data.batch_size == 2
    assert compose_valid("experiment=detr_r18_coco", "backbone=resnet34").backbone.name == "resnet34"


def test_local_slurm_fits_the_test_cluster():
    lines = sbatch_lines("cluster=local_slurm", jobs=12)
    for expected in ("--partition=debug", "--account=sparse", "--cpus-per-task=1", "--mem=2GB", "--time=30",
                     "--array=0-11%4"):
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    assert not any(line.startswith(("#SBATCH --gpus", "#SBATCH --gres")) for line in lines)


@pytest.mark.parametrize("cluster", ["berzelius", "rpl", "local_slurm"])
def test_every_slurm_profile_requeues_and_writes_into_the_sweep_folder(cluster, monkeypatch):
    monkeypatch.setenv("SPARSE_DETR_ACCOUNT", "a")
    cfg = compose_with_hydra([f"cluster={cluster}", "experiment=smoke"])
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    executor = submitit_executor(cfg)
    # The launcher's default (0) would never requeue a run that reached its time limit.
    assert executor._executor.max_num_timeout > 0
    # Above 10 minutes, or submitit takes every USR2 for a time-out.
    assert executor._executor.parameters["time"] > 10
    assert str(executor.folder).endswith("outputs/sweeps/smoke/.submitit/%j")


def test_the_local_profile_does_not_submit():
    with pytest.raises(ValueError, match="does not submit to SLURM"):
        sbatch_script(["cluster=local"])


# ------------------------------------------------------------------------------ console scripts

def run(command, cwd, env=None, timeout=120):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cfg_job_info_and_completion_work_from_any_folder(tmp_path):
    train = [sys.executable, "-m", "sparse_detr.train"]
    result = run([*train, "--cfg", "job", "cluster=rpl", "attention=entmax15"], tmp_path)
    assert result.returncode == 0, result.stderr
    job = OmegaConf.create(result.stdout)
    assert job.cluster.name == "rpl" and job.attention.name == "entmax15" and "hydra" not in job
    result = run([*train, "--info", "defaults"], tmp_path)
    assert result.returncode == 0 and "cluster/local" in result.stdout
    result = run([*train, "-sc", "query=bash"], tmp_path, env={"COMP_LINE": "sparse-detr-train cluster="})
    assert set(result.stdout.split()) == {f"cluster={c}" for c in options("cluster")}
    assert not list(tmp_path.iterdir()), "inspecting the config must not write anything"


def test_a_sweep_with_one_bad_value_launches_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    result = run([sys.executable, "-m", "sparse_detr.train", "-m", "experiment=smoke",
                  "attention=alpha_entmax", "attention.alpha=1.5,2.5", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 2
    assert "attention.alpha=2.5 is out of range; valid: (1.0, 2.0]" in result.stderr
    assert "sweep run #1" in result.stderr and "nothing was launched" in result.stderr
    assert not sweep.exists()

    result = run([sys.executable, "-m", "sparse_detr.train", "-m", "experiment=smoke",
                  "attention=softmax,sparsmax", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 2
    assert "Could not find 'attention/sparsmax'" in result.stderr and "entmax15" in result.stderr
    assert not sweep.exists()


def test_a_slurm_sweep_without_its_account_submits_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    result = run([sys.executable, "-m", "sparse_detr.train", "-m", "experiment=smoke", "cluster=berzelius",
                  "attention=softmax,sparsemax", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 2
    assert "SPARSE_DETR_ACCOUNT" in result.stderr and "hydra.launcher.account" in result.stderr
    assert not sweep.exists()


def test_the_wheel_ships_conf_and_runs_without_the_source_tree(tmp_path):
    """A non-editable install finds its config inside the package (sparse_detr/conf)."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "outputs", "build", "*.egg-info", "__pycache__",
                                                  ".pytest_cache", "wandb", ".benchmarks"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                 "-w", str(tmp_path / "wheel"), str(source)], tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("sparse_detr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for group in GROUPS:
        for option in options(group):
            assert f"sparse_detr/conf/{group}/{option}.yaml" in names
    assert "sparse_detr/conf/train.yaml" in names
    assert "hydra_plugins/sparse_detr_sweeper/distinct_runs_sweeper.py" in names  # the sweeper train.yaml selects

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import sparse_detr, sparse_detr.config as c; "
             "print(sparse_detr.__file__); print(c.config_dir())")
    result = run([sys.executable, "-c", probe], elsewhere, env={"PYTHONPATH": str(installed)})
    module_file, conf = result.stdout.split()
    assert module_file.startswith(str(installed)) and conf == str(installed / "sparse_detr" / "conf")
    result = run([sys.executable, "-m", "sparse_detr.train", "--cfg", "job", "cluster=berzelius"], elsewhere,
                 env={"PYTHONPATH": str(installed)})
    assert result.returncode == 0, result.stderr
    assert OmegaConf.create(result.stdout).cluster.name == "berzelius"


def test_a_learned_alpha_must_start_strictly_inside_its_range(compose):
    from sparse_detr.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"attention.alpha \(learned, initial\)=2.0 .*\(1.01, 2.0\)"):
        validate(compose("attention=alpha_entmax", "attention.alpha=2.0"))
    validate(compose("attention=alpha_entmax", "attention.alpha=2.0", "attention.learn_alpha=false"))


# ------------------------------------------------------------------------------ user errors: one line, exit 2

TRAIN = [sys.executable, "-m", "sparse_detr.train", "experiment=smoke", "train.progress=off"]


def one_error_line(result) -> str:
    """The stderr of a run stopped by a user error: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize("overrides, message", [
    (["+model.hiden_dim=64"], "model.hiden_dim is not a config key; valid keys there: aux_loss, dec_layers"),
    (["optim.lr=nan"], "optim.lr=nan is not a number"),
    (["model.dropout=nan"], "model.dropout=nan is not a number"),
    (["attention=alpha_entmax", "attention.alpha=nan"], "attention.alpha=nan is not a number"),
    (["backbone=resnet18", "backbone.dilation=true"], "with backbone.dilation=true)='resnet18' is not valid; choose one of: resnet50, resnet101"),
    (["resume=/nowhere/checkpoint.pth"], "resume='/nowhere/checkpoint.pth': no such file"),
    (["init_from=/nowhere/detr.pth"], "init_from='/nowhere/detr.pth': no such file"),
])
def test_a_bad_run_stops_with_one_line_before_anything_is_built_or_written(tmp_path, overrides, message):
    result = run([*TRAIN, *overrides], tmp_path)
    assert message in one_error_line(result)
    assert not list(tmp_path.iterdir()), "nothing is written, not even the run folder"


def test_nan_fails_every_range_check():
    from sparse_detr.checks import check_range

    for bounds in ({}, {"low": 0.0}, {"high": 1.0}, {"low": 0.0, "high": 1.0, "low_open": True}):
        with pytest.raises(ConfigError, match="is not a number"):
            check_range("x", float("nan"), **bounds)


@pytest.mark.parametrize("sweep", [False, True])
def test_a_secret_on_the_command_line_stops_the_run_and_is_written_nowhere(tmp_path, sweep):
    sweep_args = ["seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"] if sweep else []
    result = run([*TRAIN[:3], *(["-m"] if sweep else []), *TRAIN[3:], *sweep_args, "logger=wandb",
                  "+logger.api_key=S3CRET-VALUE"], tmp_path)
    line = one_error_line(result)
    assert "logger.api_key looks like a secret" in line and "WANDB_API_KEY" in line
    assert "S3CRET-VALUE" not in result.stderr + result.stdout
    assert not list(tmp_path.iterdir()), "nothing is written: no run folder, no .hydra/, no command.txt"


def test_a_missing_data_set_is_one_line_not_a_traceback(tmp_path):
    data = ["data=coco_format", f"data.train_images={tmp_path}/none", f"data.train_annotations={tmp_path}/none.json",
            f"data.val_images={tmp_path}/none", f"data.val_annotations={tmp_path}/none.json"]
    line = one_error_line(run([*TRAIN, *data, f"hydra.run.dir={tmp_path}/run"], tmp_path))
    assert line == f"error: annotation file not found: {tmp_path}/none.json"
    line = one_error_line(run([*TRAIN, "data=coco", f"data.root={tmp_path}/coco", f"hydra.run.dir={tmp_path}/run"],
                              tmp_path))
    assert line.startswith(f"error: COCO 2017 not found: missing {tmp_path}/coco/train2017") and "instances_val2017" in line


def test_a_sweep_that_asks_for_one_model_twice_trains_it_once(tmp_path):
    """sparsemax and entmax15 placed nowhere are both the softmax baseline."""
    sweep = tmp_path / "sweep"
    result = run([*TRAIN[:3], "-m", *TRAIN[3:], "attention=sparsemax,entmax15", "placement=none", "train.max_steps=1",
                  f"hydra.sweep.dir={sweep}"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run #1 (experiment=smoke train.progress=off attention=entmax15 placement=none train.max_steps=1) " \
           "is the same model as run #0" in result.stderr
    manifest = json.loads((sweep / "sweep_runs.json").read_text())["runs"]
    assert [r["run_dir"] for r in manifest] == ["softmax-none-tiny-shapes/seed_42"]
    run_folders = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.rglob("config.yaml")
                         if ".hydra" not in p.parts)
    assert run_folders == [manifest[0]["run_dir"]]
    assert (sweep / manifest[0]["run_dir"] / "command.txt").read_text().count("\n") == 1, "trained once"


def test_a_missing_resume_file_is_no_error_once_the_run_has_its_own_checkpoint_or_is_only_evaluated(tmp_path):
    from sparse_detr.config import validate_run

    cfg = load_config(["experiment=smoke", f"resume={tmp_path}/moved.pth", f"init_from={tmp_path}/gone.pth"])
    with pytest.raises(ConfigError, match="resume=.*moved.pth'?: no such file"):
        validate_run(cfg, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")  # a requeue: the run resumes from its own file
    validate_run(cfg, tmp_path / "run")
    validate(cfg)  # sparse-detr-eval checks a saved config on another machine: the files are not needed
