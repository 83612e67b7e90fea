"""The benchmark scripts run and report what they claim (timings themselves are never asserted)."""
import argparse

from sparse_detr.bench import mappings


def test_training_section_reports_every_attention_choice_against_softmax(monkeypatch):
    monkeypatch.setattr(mappings, "TRAINING_MODELS", [("smoke", ["experiment=smoke"], 2, 64, 64)])
    table = mappings.training_section(argparse.Namespace(repeats=1), mappings.torch.device("cpu"))
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| smoke")]
    assert [row[1].strip() for row in rows] == list(mappings.TRAINING_ATTENTION)
    assert rows[0][3].strip() == "1.00"          # softmax against itself
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows)
