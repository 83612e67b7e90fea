"""A run spans two nodes of the local SLURM test cluster (node1 and node2, each in its own network
namespace with its own address), through the path a user takes on Berzelius:
`sparse-detr-train -m cluster=local_slurm hydra.launcher.nodes=2 ...`. Run with:

    python -m pytest -m slurm tests/integration/test_two_nodes.py -p no:cacheprovider

Skipped, with the reason, where the cluster could only be made with one node (no network namespaces).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
from slurm_sweeps import checkpoint_step, job_ids, sweep_process, sweep_status, wait_for_exit
from submitit.slurm.slurm import SlurmJobEnvironment

from sparse_detr.engine import distributed
from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME

pytestmark = pytest.mark.slurm

TWO_NODES = ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"]
# What makes two processes with half the batch each compute exactly what one process computes on
# the whole batch: no dropout (each rank has its own dropout stream), one image size (no padding
# that depends on the batch) and no class-loss weighting (DETR's weighted class loss is a mean over
# each process's own class weights, which depend on how many of its queries are matched). Batches
# are split across ranks as DistributedSampler splits them, so step k of 2 ranks x 4 images is
# step k of 1 rank x 8 images.
SAME_GLOBAL_BATCH = ["attention=entmax15", "placement=all", "attention.impl=eager", "model.dropout=0.0",
                     "loss.eos_coef=1.0", "data.train_scales=[64]", "train.max_steps=1", "train.log_every=1"]
BATCH_PER_RANK = 4


def run_folder(sweep_dir: Path) -> Path:
    (run_dir,) = sweep_dir.glob("*/seed_42")
    return run_dir


def first_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (loss,) = [row["train-main-metrics/loss"] for row in rows if row.get("global_step") == 1
               and "train-main-metrics/loss" in row]
    return loss


def first_moments(run_dir: Path) -> dict[int, torch.Tensor]:
    """AdamW's first moment after one step: (1 - beta1) x the (clipped) gradient of each parameter."""
    checkpoint = load_training_checkpoint(run_dir / CHECKPOINT_NAME)
    assert checkpoint["state"]["global_step"] == 1
    return {index: state["exp_avg"] for index, state in checkpoint["optimizer"]["state"].items()}


def allocation_nodes(slurm_cluster, job_id: str) -> list[str]:
    """The node list of every run of the job (one row per requeue)."""
    return [row["NodeList"] for row in slurm_cluster.sacct(job_id, "NodeList", duplicates=True)]


def test_a_two_node_run_has_the_loss_and_gradients_of_one_process_on_the_same_batch(two_node_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    with sweep_process(two_node_cluster, tmp_path, sweep_dir, *TWO_NODES, *SAME_GLOBAL_BATCH,
                       f"data.batch_size={BATCH_PER_RANK}") as process:
        wait_for_exit(two_node_cluster, process, tmp_path, timeout_s=300)
    run_dir = run_folder(sweep_dir)
    (status,) = sweep_status(sweep_dir)
    assert allocation_nodes(two_node_cluster, status["job"]) == ["node[1-2]"]
    log = (run_dir / "train.log").read_text()

    single_dir = tmp_path / "single"
    single = subprocess.run(
        [sys.executable, "-m", "sparse_detr.train", "experiment=smoke", "train.progress=off", *SAME_GLOBAL_BATCH,
         f"data.batch_size={2 * BATCH_PER_RANK}", f"output_dir={single_dir}", f"hydra.run.dir={single_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    torch.testing.assert_close(first_loss(run_dir), first_loss(single_dir), rtol=1e-5, atol=0)
    ddp, one = first_moments(run_dir), first_moments(single_dir)
    assert ddp.keys() == one.keys()
    for index in one:
        torch.testing.assert_close(ddp[index], one[index], rtol=1e-4, atol=1e-9,
                                   msg=lambda text, index=index: f"parameter {index}: {text}\n{log[-2000:]}")


def rendezvous_script(out_dir: Path) -> str:
    """What each task of the job runs: join the process group from SLURM's environment alone."""
    return f"""
import json, os, socket
import torch, torch.distributed as dist
from sparse_detr.engine import distributed
for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
    os.environ.pop(name, None)
ctx = distributed.setup("cpu")
total = torch.tensor([ctx.rank + 1.0])
dist.all_reduce(total)
seen = {{"rank": ctx.rank, "world_size": ctx.world_size, "host": socket.gethostname(),
        "master_addr": os.environ["MASTER_ADDR"], "nodelist": os.environ["SLURM_JOB_NODELIST"],
        "sum": total.item()}}
with open(os.path.join({str(out_dir)!r}, f"rank{{ctx.rank}}.json"), "w") as handle:
    json.dump(seen, handle)
distributed.teardown()
"""


def test_master_addr_comes_from_the_multi_host_node_list_and_both_nodes_meet_there(two_node_cluster, tmp_path):
    script = tmp_path / "rendezvous.py"
    script.write_text(rendezvous_script(tmp_path))
    job_id = two_node_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "-c", "1", "-p", two_node_cluster.partition, "-A", two_node_cluster.account,
        "-o", str(tmp_path / "%j.out"), "--wrap", f"srun {sys.executable} {script}")
    state = two_node_cluster.wait_finished(job_id, timeout_s=180)
    output = next(tmp_path.glob("*.out")).read_text()
    assert state == "COMPLETED", output[-3000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["host"] for r in ranks] == ["node1", "node2"]
    for seen in ranks:
        assert seen["nodelist"] == "node[1-2]" and seen["world_size"] == 2
        assert seen["master_addr"] == "node1"        # the first host, not the compressed list
        assert seen["sum"] == 3.0                    # 1 + 2: the ranks on both hosts met


@pytest.mark.parametrize("nodelist", ["node[1-2]", "a[01-03,7],b1", "gpu[08-10],cpu3", "rack[1-2]n[09-10]"])
def test_the_node_list_parser_agrees_with_scontrol(slurm_cluster, monkeypatch, nodelist):
    expected = slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    assert SlurmJobEnvironment().hostnames == expected
    assert distributed.slurm_master_address() == expected[0]


def test_a_signalled_two_node_run_is_requeued_and_resumes_in_the_same_wandb_run(two_node_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # smoke: 32 images, 4 per rank, 2 ranks; about 10 steps a second, so 160 steps leave time to
    # signal the job while it trains (evaluating only at the end).
    epochs, steps_per_epoch = 40, 32 // (2 * 4)
    overrides = [*TWO_NODES, "attention=softmax", "placement=cross", f"schedule.epochs={epochs}",
                 f"train.eval_every={epochs}", "train.log_every=1", "logger=wandb", "logger.mode=offline"]
    run_dir = sweep_dir / f"softmax-none-tiny-shapes+schedule.epochs={epochs}/seed_42"  # every site softmax: the baseline
    with sweep_process(two_node_cluster, tmp_path, sweep_dir, *overrides) as process:
        two_node_cluster.wait_until(lambda: checkpoint_step(run_dir / CHECKPOINT_NAME) >= steps_per_epoch, 240,
                                    "the first checkpoint of the two-node run", interval_s=0.2)
        (job_id,) = job_ids(sweep_dir)
        # What SLURM sends before the time limit; it reaches the task on each node.
        submitit.SlurmJob(folder=sweep_dir / ".submitit" / "%j", job_id=job_id)._interrupt(timeout=True)
        two_node_cluster.wait_until(lambda: "resumed from" in (run_dir / "train.log").read_text(), 180,
                                    "the requeued run to resume", interval_s=0.5)
        wait_for_exit(two_node_cluster, process, tmp_path, timeout_s=300)

    log = (run_dir / "train.log").read_text()
    signalled = re.search(r"received SIGUSR2 at step (\d+): checkpoint saved", log)
    resumed = re.search(r"resumed from .* at epoch \d+, step (\d+)", log)
    assert signalled and resumed, log[-3000:]
    assert steps_per_epoch <= int(signalled.group(1)) == int(resumed.group(1)) < epochs * steps_per_epoch
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["global_step"] for row in rows if "train-main-metrics/loss" in row]
    assert steps == list(range(1, epochs * steps_per_epoch + 1))     # nothing lost, nothing repeated
    # One W&B run: two offline segments (one per run of the job) with the checkpoint's run id.
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_ids = {segment.name.rsplit("-", 1)[1] for segment in segments}
    assert len(segments) == 2 and run_ids == {load_training_checkpoint(run_dir / CHECKPOINT_NAME)["tracker_run_id"]}
    # Both runs of the job held both nodes.
    two_node_cluster.wait_until(lambda: two_node_cluster.state(job_id) == "COMPLETED", 30, "sacct to say COMPLETED")
    assert [r["State"] for r in two_node_cluster.sacct(job_id, duplicates=True)] == ["REQUEUED", "COMPLETED"]
    assert allocation_nodes(two_node_cluster, job_id) == ["node[1-2]", "node[1-2]"]
