"""Fixtures of the unit tests that run the package's commands."""
import pytest

from entry_points import CLUSTER_ENV


@pytest.fixture
def clean_cluster_env(monkeypatch):
    """No SPARSE_DETR_* settings from the environment of whoever runs the tests."""
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
