"""What a run records about the code that ran it, and the report's flag for variants of mixed code."""
from __future__ import annotations

import json
import platform
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from sparse_detr.analysis.sweep_table import CODE_COLUMN, mixed_code
from sparse_detr.run_folder import PROVENANCE_NAME
from sparse_detr.provenance import (collect, git_state, read_provenance, record_provenance,
                                    run_commits)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git checkout holding a package `pkg/` and a .gitignore'd `outputs/`, one commit made."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("outputs/\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    return repo


@needs_git
def test_a_clean_checkout_records_its_commit_and_not_dirty(checkout):
    (checkout / "outputs").mkdir()
    (checkout / "outputs" / "run.txt").write_text("ignored files do not make the tree dirty")
    assert git_state(checkout / "pkg") == {"git_commit": git(checkout, "rev-parse", "HEAD"), "git_dirty": False}


@needs_git
@pytest.mark.parametrize("change", ["edit", "untracked"])
def test_an_edited_or_added_file_makes_the_tree_dirty(checkout, change):
    if change == "edit":
        (checkout / "pkg" / "__init__.py").write_text("x = 2\n")
    else:
        (checkout / "pkg" / "new_module.py").write_text("")
    assert git_state(checkout / "pkg") == {"git_commit": git(checkout, "rev-parse", "HEAD"), "git_dirty": True}


@needs_git
def test_a_package_installed_inside_another_repository_has_no_git_fields(checkout):
    installed = checkout / "venv" / "lib" / "site-packages" / "sparse_detr"
    installed.mkdir(parents=True)
    assert git_state(installed) == {"git_commit": None, "git_dirty": None}


def test_no_checkout_or_no_git_gives_null_git_fields(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    assert git_state(tmp_path / "pkg") == {"git_commit": None, "git_dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no git on PATH at all
    assert git_state(Path(__file__).resolve().parents[2] / "sparse_detr") == {"git_commit": None, "git_dirty": None}


def test_collect_names_python_torch_cuda_and_host():
    record = collect()
    assert {"package_version", "git_commit", "git_dirty", "python", "torch", "cuda", "host", "time"} <= set(record)
    assert record["python"] == platform.python_version() and record["torch"] == torch.__version__
    assert record["cuda"] == torch.version.cuda and record["host"] == socket.gethostname()
    json.dumps(record)  # fit for provenance.json and the W&B config as it is


def test_every_start_of_a_run_is_kept_latest_on_top(tmp_path):
    first = {"git_commit": "a" * 40, "git_dirty": False, "host": "n1"}
    second = {"git_commit": "b" * 40, "git_dirty": True, "host": "n2"}
    record_provenance(tmp_path, first)
    assert read_provenance(tmp_path) == {**first, "earlier": []}
    record_provenance(tmp_path, second)
    assert read_provenance(tmp_path) == {**second, "earlier": [first]}
    assert run_commits(read_provenance(tmp_path)) == {"a" * 40, "b" * 40 + "+dirty"}
    assert json.loads((tmp_path / PROVENANCE_NAME).read_text())["host"] == "n2"


def test_runs_without_a_record_or_without_git_are_unknown(tmp_path):
    assert read_provenance(tmp_path) is None and run_commits(None) == {"unknown"}
    assert run_commits({"git_commit": None, "git_dirty": None, "earlier": []}) == {"unknown"}


def test_only_variants_of_mixed_dirty_or_unknown_code_are_flagged():
    columns = ["attention", "placement"]
    variants = [
        {"attention": "softmax", "placement": "none", CODE_COLUMN: "a" * 40},
        {"attention": "sparsemax", "placement": "cross", CODE_COLUMN: f"{'a' * 40};{'b' * 40}"},
        {"attention": "entmax15", "placement": "cross", CODE_COLUMN: "c" * 40 + "+dirty"},
        {"attention": "alpha_entmax", "placement": "cross", CODE_COLUMN: "unknown"},
    ]
    assert mixed_code(variants, columns) == [
        f"- sparsemax · cross: {'a' * 12}, {'b' * 12}",
        f"- entmax15 · cross: {'c' * 12}+dirty",
        "- alpha_entmax · cross: unknown",
    ]
