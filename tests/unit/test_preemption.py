"""The preemption guard: a signal only sets a flag; after the step the trainer saves, then hands the
signal to the handler that was there before (submitit's, which requeues), or stops by itself."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from sparse_detr.engine import distributed
from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.engine.preemption import PreemptionGuard
from sparse_detr.signals import signal_names, to_signal


@pytest.fixture
def fake_submitit_handler():
    """A stand-in for submitit's `checkpoint_and_try_requeue`: records its calls, then exits the way
    submitit does after `scontrol requeue` (sys.exit(-1))."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, handler)
    yield handler, calls
    signal.signal(signal.SIGUSR2, previous)


def test_signal_names_and_conversion():
    assert {"USR1", "USR2", "TERM", "INT"} <= set(signal_names())
    assert "KILL" not in signal_names()
    assert to_signal("USR2") == to_signal("SIGUSR2") == to_signal(int(signal.SIGUSR2)) == signal.SIGUSR2


def test_the_signal_only_sets_a_flag_until_the_trainer_acts(fake_submitit_handler):
    handler, calls = fake_submitit_handler
    guard = PreemptionGuard(["USR2"]).install()
    assert guard.previous_handler(signal.SIGUSR2) is handler
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert guard.requested() and guard.received == signal.SIGUSR2
    assert calls == [], "the previous handler must not run inside the signal"

    order = []
    with pytest.raises(SystemExit) as exit_info:
        guard.stop(lambda: order.append(("save", list(calls))), "step 7")
    assert order == [("save", [])], "the checkpoint is saved before the handler requeues"
    assert calls == [signal.SIGUSR2] and exit_info.value.code == -1
    guard.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is handler


def test_a_previous_handler_that_returns_still_stops_the_run(capsys):
    """submitit's handler returns on ranks other than 0 (rank 0 requeues the whole job)."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        guard = PreemptionGuard().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(SystemExit) as exit_info:
            guard.stop(lambda: None, "step 3")
        assert calls == [signal.SIGUSR2] and exit_info.value.code == 128 + signal.SIGUSR2
        guard.uninstall()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_without_a_previous_handler_it_saves_and_exits_with_a_message(capsys):
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        guard = PreemptionGuard(["USR2", "TERM"]).install()
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the test process without the guard
        assert guard.requested() and guard.received == signal.SIGTERM
        saved = []
        with pytest.raises(SystemExit) as exit_info:
            guard.stop(lambda: saved.append(True), "step 5", "/runs/x/checkpoint.pth")
        assert saved == [True] and exit_info.value.code == 128 + signal.SIGTERM
        message = capsys.readouterr().err
        assert "received SIGTERM at step 5" in message and "/runs/x/checkpoint.pth" in message
        assert "again to resume" in message
        guard.uninstall()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_trainer_checkpoints_after_the_step_then_requeues_and_resumes(compose, tmp_path, fake_submitit_handler):
    from sparse_detr.engine.trainer import Trainer

    handler, calls = fake_submitit_handler
    cfg = compose("train.progress=off", "data.num_train=8", "data.num_val=2", "data.batch_size=2",
                  "data.image_size=32", "schedule.epochs=1")
    run_dir = tmp_path / "run"
    saved_when_requeued = []

    def requeue(signum, frame):  # what submitit would do: by then the checkpoint must be on disk
        saved_when_requeued.append(load_training_checkpoint(run_dir / "checkpoint.pth")["state"])
        handler(signum, frame)

    signal.signal(signal.SIGUSR2, requeue)
    trainer = Trainer(cfg, run_dir)
    trainer.tracker.log_epoch = lambda *a, **k: None
    original_step = trainer._on_step

    def on_step(state):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # arrives during step 2
        original_step(state)

    trainer._on_step = on_step
    with pytest.raises(SystemExit):
        trainer.fit()
    trainer.close(exit_code=1)
    assert calls == [signal.SIGUSR2]
    assert len(saved_when_requeued) == 1
    saved = saved_when_requeued[0]
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (0, 2, 2)
    assert saved["epoch_sums"]["train-main-metrics/loss"] > 0  # the epoch's means survive the requeue
    assert signal.getsignal(signal.SIGUSR2) is requeue, "close() gives the signal back"

    resumed = Trainer(cfg, run_dir)  # the requeued job: same call, same run folder
    assert resumed.state.global_step == 2
    resumed.fit()
    resumed.close()
    assert load_training_checkpoint(run_dir / "checkpoint.pth")["state"]["global_step"] == 4


def test_ranks_come_from_the_environment_srun_gives_submitit_tasks(monkeypatch):
    """One task per GPU on 2 nodes x 4 GPUs: task 6 is rank 6 of 8, GPU 2 of its node, as
    submitit's JobEnvironment sees it too."""
    import submitit

    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_PROCID": "6", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "a100-[01-02]"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    job = submitit.JobEnvironment()
    assert distributed.environment_ranks(os.environ) == (job.global_rank, job.num_tasks, job.local_rank) == (6, 8, 2)
    assert distributed.choose_device("auto", 2) == (torch.device("cuda", 2) if torch.cuda.is_available()
                                                    else torch.device("cpu"))


def _rank_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = distributed.setup("cpu")
    guard = PreemptionGuard().install()
    stopped_at = None
    for step in range(1, 8):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # only one rank is signalled
        if guard.requested(ctx):
            stopped_at = step
            break
    torch.save({"step": stopped_at, "signal": int(guard.received or 0)}, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.teardown()


@pytest.mark.distributed
def test_every_rank_stops_at_the_same_step_when_one_is_signalled(tmp_path):
    """Saving gathers every rank's random streams, so all ranks must take the same decision."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results == [{"step": 3, "signal": int(signal.SIGUSR2)}] * 2
