"""The training entry point shortens OpenMP's spin waits before torch loads, and keeps a user's choice."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparse_detr import openmp


@pytest.mark.parametrize("preset, expected", [
    ({}, {"GOMP_SPINCOUNT": openmp.SPIN_COUNT}),
    ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT": "300000"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
])
def test_the_spin_count_is_set_only_where_the_user_set_no_waiting(monkeypatch, preset, expected):
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in preset.items():
        monkeypatch.setenv(key, value)
    openmp.shorten_spin_waits()
    assert {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ} == expected


def test_the_training_module_loads_without_torch_so_the_setting_comes_first():
    code = "import sys, sparse_detr.train; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
