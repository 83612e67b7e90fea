"""The benchmark scripts run and report what they claim (timings themselves are never asserted)."""
import argparse

import pytest

from sparse_detr.bench import mappings
from sparse_detr.models.mappings.base import Softmax


def test_training_section_reports_every_attention_choice_against_softmax(monkeypatch):
    monkeypatch.setattr(mappings, "TRAINING_MODELS", [("smoke", ["experiment=smoke"], 2, 64, 64)])
    table = mappings.training_section(argparse.Namespace(repeats=1), mappings.torch.device("cpu"))
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| smoke")]
    assert [row[1].strip() for row in rows] == list(mappings.TRAINING_ATTENTION)
    assert rows[0][3].strip() == "1.00"          # softmax against itself
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows)


def test_mapping_section_times_every_shape_against_plain_torch_softmax(monkeypatch):
    """The softmax row is torch.softmax itself (not the module), every shape in one table."""
    monkeypatch.setattr(mappings, "SHAPES", {"encoder": (6, 6), "cross": (3, 6), "decoder-self": (3, 3)})
    plain_calls = []
    softmax = mappings.torch.softmax
    monkeypatch.setattr(mappings.torch, "softmax", lambda *a, **k: plain_calls.append(1) or softmax(*a, **k))
    module_forward = Softmax.forward
    monkeypatch.setattr(Softmax, "forward", lambda *a, **k: pytest.fail("the softmax module was timed"))
    table = mappings.mapping_section(argparse.Namespace(repeats=2, quick=True), mappings.torch.device("cpu"))
    monkeypatch.setattr(Softmax, "forward", module_forward)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[4:]]
    names = ["softmax", "sparsemax (fast)", "entmax15 (fast)", "alpha_entmax (fast)"]
    assert [(row[0], row[1]) for row in rows] == [(n, s) for n in names for s in ("6x6", "3x6", "3x3")]
    assert [row[3] for row in rows[:3]] == ["1.00"] * 3
    assert all(float(row[2]) > 0 for row in rows)
    assert len(plain_calls) >= 3 * 3  # first call + 2 repeats at each shape
