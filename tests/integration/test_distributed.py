"""Two processes with gloo on the CPU give the loss and gradients of one process on the same data."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sparse_detr import build_model, load_config
from sparse_detr.engine import distributed
from sparse_detr.matching.criterion import total_loss

OVERRIDES = ["experiment=smoke", "model.num_classes=5", "model.dropout=0.0", "attention=entmax15",
             "placement=all", "attention.impl=eager"]


def batch():
    """Two images with two boxes each: every process holds the same number of boxes, so DETR's
    per-process class-loss normalisation equals the single-process one exactly."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    boxes = [[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]], [[0.5, 0.5, 0.5, 0.5], [0.2, 0.8, 0.1, 0.2]]]
    targets = [{"labels": torch.tensor(labels), "boxes": torch.tensor(b, dtype=torch.float64)}
               for labels, b in zip([[1, 3], [0, 4]], boxes)]
    return images, targets


def build():
    """The model in float64, so that summing gradients in another order changes nothing visible."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(load_config(OVERRIDES))
    return model.double(), criterion.double()


def loss_and_gradients(model, criterion, images, targets):
    loss = total_loss(criterion(model(images), targets), criterion.weight_dict)
    loss.backward()
    module = model.module if hasattr(model, "module") else model
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = distributed.setup("cpu")
    model, criterion = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, targets = batch()
    loss, grads = loss_and_gradients(ddp, criterion, images[rank:rank + 1], targets[rank:rank + 1])
    torch.distributed.all_reduce(loss)
    if ctx.is_main:
        torch.save({"loss": loss / 2, "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    distributed.teardown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_gloo_processes_agree_with_one_process(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    model, criterion = build()
    loss, grads = loss_and_gradients(model, criterion, *batch())
    torch.testing.assert_close(ddp["loss"], loss, rtol=1e-10, atol=1e-12)
    assert ddp["grads"].keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ddp["grads"][name], grads[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_ranks_come_from_torchrun_or_slurm_environment():
    assert distributed.environment_ranks({}) == (0, 1, 0)
    assert distributed.environment_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8, 3)
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert distributed.environment_ranks(slurm) == (9, 16, 1)
    assert distributed.environment_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)


@pytest.mark.parametrize("nodelist, first", [
    ("node[1-2]", "node1"), ("a[01-03,7],b1", "a01"), ("b1,a[01-03,7]", "b1"),
    ("berzelius[008-010]", "berzelius008"), ("rack[2-3]n[09-10]", "rack2n09"), ("gpu7", "gpu7"),
])
def test_master_addr_is_the_first_host_of_the_slurm_node_list(monkeypatch, nodelist, first):
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    monkeypatch.setenv("PATH", "")  # no scontrol to ask: the node list alone must do
    assert distributed.slurm_master_address() == first
