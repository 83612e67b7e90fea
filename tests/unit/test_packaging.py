"""The console scripts find `conf/` from any folder, installed from a wheel or from the source tree."""
from __future__ import annotations

import shutil
import sys
import zipfile

import pytest
from omegaconf import OmegaConf

from entry_points import GROUPS, REPO, options, run

pytestmark = pytest.mark.usefixtures("clean_cluster_env")


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
    for group in [*GROUPS, "study"]:
        for option in options(group):
            assert f"sparse_detr/conf/{group}/{option}.yaml" in names
    assert {"sparse_detr/conf/train.yaml", "sparse_detr/conf/study.yaml"} <= names
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
