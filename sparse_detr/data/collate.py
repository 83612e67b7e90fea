"""Batching images of different sizes: zero-pad to the largest and keep a mask of the padding."""
from __future__ import annotations

import torch


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H_i, W_i] images -> ([B, 3, H, W] zero-padded batch, [B, H, W] mask, True on padding)."""
    if not images:
        raise ValueError("pad_images needs at least one image")
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]].copy_(image)
        mask[i, : image.shape[-2], : image.shape[-1]] = False
    return batch, mask


def collate(samples: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """DataLoader collate_fn: (image, target) pairs -> (padded images, padding mask, targets)."""
    images, targets = zip(*samples)
    batch, mask = pad_images(list(images))
    return batch, mask, list(targets)
