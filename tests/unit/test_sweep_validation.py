"""A sweep is checked before anything starts (`ValidateSweep`): a bad value, a missing account or
a secret stops it naming the run and the key; a model asked for twice is trained once."""
from __future__ import annotations

import json
import sys

import pytest
from omegaconf import OmegaConf

from entry_points import TRAIN, one_error_line, run
from sparse_detr.sweep.compose import compose_with_hydra

pytestmark = pytest.mark.usefixtures("clean_cluster_env")


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


@pytest.mark.parametrize("sweep", [False, True])
def test_a_secret_on_the_command_line_stops_the_run_and_is_written_nowhere(tmp_path, sweep):
    sweep_args = ["seed=1,2", f"hydra.sweep.dir={tmp_path}/sweep"] if sweep else []
    result = run([*TRAIN[:3], *(["-m"] if sweep else []), *TRAIN[3:], *sweep_args, "logger=wandb",
                  "+logger.api_key=S3CRET-VALUE"], tmp_path)
    line = one_error_line(result)
    assert "logger.api_key looks like a secret" in line and "WANDB_API_KEY" in line
    assert "S3CRET-VALUE" not in result.stderr + result.stdout
    assert not list(tmp_path.iterdir()), "nothing is written: no run folder, no .hydra/, no command.txt"


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


@pytest.mark.parametrize("module, overrides, named", [
    ("sparse_detr.train", ["experiment=smoke", "attention=sparsmax"], "sparsemax"),   # a misspelt option: the valid ones
    ("sparse_detr.train", ["model.hiden_dim=3"], "model.hiden_dim"),                  # a misspelt key
    ("sparse_detr.report", ["sweep_dir=.", "metric=AP"], "metric"),
])
def test_a_misspelt_option_or_key_of_a_single_run_is_one_line_and_exit_2(tmp_path, module, overrides, named):
    line = one_error_line(run([sys.executable, "-m", module, *overrides], tmp_path))
    assert named in line and "Config search path" not in line
    assert not (tmp_path / "outputs").exists()
