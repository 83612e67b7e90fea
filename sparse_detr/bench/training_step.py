"""One training step of a configured DETR on a fixed random batch: what the benchmarks time."""
from __future__ import annotations

import torch

from sparse_detr.engine.optim import build_optimizer
from sparse_detr.matching.criterion import total_loss
from sparse_detr.models.detr import build_model, resolve_num_classes

# Three boxes per image (cxcywh, relative): the set loss and the matcher get real work.
BOXES = [[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.7, 0.5, 0.2]]


def random_batch(batch: int, height: int, width: int, device, num_classes: int):
    """(images [B, 3, H, W], mask [B, H, W] without padding, targets) drawn from torch's global RNG."""
    images = torch.randn(batch, 3, height, width, device=device)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    targets = [{"labels": torch.randint(num_classes, (len(BOXES),), device=device),
                "boxes": torch.tensor(BOXES, device=device)} for _ in range(batch)]
    return images, mask, targets


def training_step(cfg, batch: int, height: int, width: int, device: torch.device):
    """(model, a closure running one step: forward, set loss, backward, clipping, AdamW)."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    model.to(device).train()
    criterion.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    images, mask, targets = random_batch(batch, height, width, device, resolve_num_classes(cfg))

    def step():
        losses = criterion(model(images, mask), targets)
        optimizer.zero_grad(set_to_none=True)
        total_loss(losses, criterion.weight_dict).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
        optimizer.step()

    return model, step
