"""Tracking: log through each backend, then read back what was written, as analysis would.

The W&B backend runs offline; what it logged is read back from the run's transaction log
(`wandb/offline-run-*/run-<id>.wandb`): a leveldb-style log of `wandb.proto` Records.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sparse_detr.config import ConfigError, validate
from wandb_reader import read_wandb_run
from sparse_detr.tracking import (LoggerConfig, NullTracker, learned_key, build_tracker, resolve_mode,
                                  scrub_secrets)

API_KEY = "0123456789abcdef0123456789abcdef01234567"
ENV_SECRET = "env-secret-that-must-not-leak"

CONFIG = {
    "seed": 3,
    "attention": {"name": "alpha_entmax", "learn_alpha": True},
    "data": {"path": "/data/coco", "auth_token": "tok-123"},
    "wandb_api_key": API_KEY,
    "services": [{"password": "hunter2", "host": "db"}],
}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, every W&B folder inside tmp_path: nothing can reach a network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_DIR", raising=False)   # default: the run folder
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.setenv("SPARSE_DETR_TEST_SECRET", ENV_SECRET)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_session(tracker, steps, epoch):
    for step in steps:
        tracker.log({"train-main-metrics/loss": 1.0 / (step + 1),
                     "train-metrics/loss_ce_0": 0.5,
                     "train-extra-metrics/lr_group_0": 1e-4,
                     learned_key("alpha", "cross", 1, 3): 1.5 + step / 100,
                     "sparsity/cross/layer_1": 0.25}, step=step)
    tracker.log_epoch({"train-epoch-main-metrics/loss": 0.4, "val-epoch-metrics/AP": 0.1 * epoch},
                      epoch=epoch)


WANDB_CFG = LoggerConfig(name="wandb", project="sparse-detr-test", group="alpha_entmax-cross",
                         run_name="alpha_entmax-cross-seed3", tags=["sweep1", "attention=alpha_entmax"])


@pytest.fixture
def first_session(tmp_path):
    run_dir = tmp_path / "run"
    tracker = build_tracker(WANDB_CFG, run_dir, CONFIG)
    log_session(tracker, steps=range(3), epoch=0)
    tracker.finish()
    return run_dir, tracker.run_id


def run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_wandb_offline_logs_groups_step_metrics_and_scrubbed_config(first_session, tmp_path):
    run_dir, run_id = first_session
    [run_file] = run_files(run_dir)
    assert run_file.name == f"run-{run_id}.wandb"
    logged = read_wandb_run(run_file)

    run = logged["run"]
    assert (run.run_id, run.project, run.run_group, run.display_name) == (
        run_id, "sparse-detr-test", "alpha_entmax-cross", "alpha_entmax-cross-seed3")
    assert list(run.tags) == ["sweep1", "attention=alpha_entmax"]

    assert logged["metrics"] == {
        "global_step": "", "epoch": "",
        "train-main-metrics/*": "global_step", "train-metrics/*": "global_step",
        "train-extra-metrics/*": "global_step", "alpha/*": "global_step", "lambda/*": "global_step",
        "sparsity/*": "global_step", "paibb/*": "global_step",
        "train-epoch-main-metrics/*": "epoch", "val-epoch-metrics/*": "epoch"}

    config = {k: v for k, v in logged["config"].items() if k != "_wandb"}
    assert config == {"seed": 3, "attention": {"name": "alpha_entmax", "learn_alpha": True},
                      "data": {"path": "/data/coco", "auth_token": "<redacted>"},
                      "wandb_api_key": "<redacted>", "services": [{"password": "<redacted>", "host": "db"}]}

    steps = [row for row in logged["history"] if "global_step" in row]
    assert [row["global_step"] for row in steps] == [0, 1, 2]
    assert [row["alpha/cross/layer_1/head_3"] for row in steps] == pytest.approx([1.5, 1.51, 1.52])
    assert {k for k in steps[0] if not k.startswith("_")} == {
        "global_step", "train-main-metrics/loss", "train-metrics/loss_ce_0",
        "train-extra-metrics/lr_group_0", "alpha/cross/layer_1/head_3", "sparsity/cross/layer_1"}
    [epoch_row] = [row for row in logged["history"] if "epoch" in row]
    assert epoch_row["epoch"] == 0 and epoch_row["val-epoch-metrics/AP"] == 0

    # no secret, from the config or the environment, anywhere under the run folder
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert API_KEY.encode() not in data and ENV_SECRET.encode() not in data, path
            assert b"hunter2" not in data and b"tok-123" not in data, path


def test_wandb_resume_reuses_run_id_and_continues_global_step(first_session):
    run_dir, run_id = first_session
    tracker = build_tracker(WANDB_CFG, run_dir, CONFIG, run_id=run_id)   # after a restart
    assert tracker.run_id == run_id
    log_session(tracker, steps=range(3, 5), epoch=1)
    tracker.finish()

    first, second = run_files(run_dir)
    assert first.name == second.name == f"run-{run_id}.wandb"
    steps = [row["global_step"] for f in (first, second)
             for row in read_wandb_run(f)["history"] if "global_step" in row]
    assert steps == [0, 1, 2, 3, 4]

    rows = read_jsonl(run_dir / "metrics.jsonl")                            # appended, not overwritten
    assert [r.get("global_step", r.get("epoch")) for r in rows] == [0, 1, 2, 0, 3, 4, 1]


def test_none_backend_writes_jsonl_only_and_appends_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    tracker = build_tracker(LoggerConfig(name="none"), run_dir, CONFIG)
    log_session(tracker, steps=range(2), epoch=0)
    tracker.finish()
    with build_tracker(LoggerConfig(name="none"), run_dir, CONFIG, run_id=tracker.run_id) as resumed:
        log_session(resumed, steps=[2], epoch=1)
    assert resumed.run_id == tracker.run_id
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r.get("global_step", r.get("epoch")) for r in rows] == [0, 1, 0, 2, 1]
    assert set(rows[0]) == {"global_step", "time", "segment", "train-main-metrics/loss", "train-metrics/loss_ce_0",
                            "train-extra-metrics/lr_group_0", "alpha/cross/layer_1/head_3",
                            "sparsity/cross/layer_1"}
    assert rows[-1] == {"epoch": 1, "time": rows[-1]["time"], "segment": resumed.segment,
                        "train-epoch-main-metrics/loss": 0.4, "val-epoch-metrics/AP": 0.1}


def test_other_ranks_get_a_noop(tmp_path):
    tracker = build_tracker(WANDB_CFG, tmp_path / "run", CONFIG, run_id="abc", rank=1)
    assert isinstance(tracker, NullTracker) and tracker.run_id == "abc"
    log_session(tracker, steps=[0], epoch=0)
    tracker.finish()
    assert not (tmp_path / "run").exists()


def test_metrics_must_go_through_their_groups_axis(tmp_path):
    with build_tracker(LoggerConfig(), tmp_path, {}) as tracker:
        with pytest.raises(ValueError, match="val-epoch-metrics/"):
            tracker.log_epoch({"loss": 1.0}, epoch=0)
        with pytest.raises(ValueError, match="train-main-metrics/"):
            tracker.log({"val-epoch-metrics/AP": 0.3}, step=0)
        with pytest.raises(TypeError):
            tracker.log({"train-metrics/name": "x"}, step=0)


def test_offline_hint_names_the_sync_command(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_detr.tracking"):
        build_tracker(WANDB_CFG, tmp_path, {}, run_id="hint1").finish()
    [hint] = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert hint.endswith(f"wandb sync {tmp_path}/wandb/offline-run-*-hint1")


def test_mode_comes_from_config_then_wandb_mode_then_offline(monkeypatch):
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode(None) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "sideways")
    with pytest.raises(ConfigError, match="online, offline, disabled"):
        resolve_mode(None)


def test_scrub_secrets_keeps_everything_else():
    assert scrub_secrets({"a": 1, "API_KEY": "x", "n": {"Secret": {"deep": 1}, "b": [1, {"token": 2}]}}) == {
        "a": 1, "API_KEY": "<redacted>", "n": {"Secret": "<redacted>", "b": [1, {"token": "<redacted>"}]}}


def test_logger_config_group(compose):
    cfg = validate(compose("logger=wandb", "logger.tags=[sweep1]", "logger.mode=disabled"))
    assert cfg.logger == LoggerConfig(name="wandb", tags=["sweep1"], mode="disabled")
    assert validate(compose()).logger == LoggerConfig(name="none")
    with pytest.raises(ConfigError, match="online, offline, disabled"):
        validate(compose("logger=wandb", "logger.mode=sometimes"))


def test_training_time_is_the_sum_of_the_segments_not_the_downtime_between(tmp_path, monkeypatch):
    """A run that trained 20 s, waited an hour in the queue, and trained 30 s more trained 50 s."""
    from sparse_detr import tracking
    from sparse_detr.analysis.run_folders import training_time_s
    from sparse_detr.run_folder import read_metrics_log

    clock = iter([1000.0, 1010.0, 1020.0, 4600.0, 4605.0, 4630.0])
    monkeypatch.setattr(tracking.time, "time", lambda: next(clock))
    for steps in ([1, 2], [3, 4]):
        with build_tracker(LoggerConfig(name="none"), tmp_path, CONFIG) as tracker:
            for step in steps:
                tracker.log({"train-main-metrics/loss": 1.0}, step=step)
    assert training_time_s(read_metrics_log(tmp_path)) == 50.0
    assert training_time_s([{"time": 5.0}, {"time": 65.0}]) == 60.0  # a log from before segments: first to last
