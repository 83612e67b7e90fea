"""The cluster profiles (conf/cluster/) produce the sbatch lines their clusters need."""
from __future__ import annotations

import pytest

from entry_points import compose_valid
from sparse_detr.sweep.compose import compose_with_hydra
from sparse_detr.sweep.slurm import sbatch_script, submitit_executor

pytestmark = pytest.mark.usefixtures("clean_cluster_env")


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
