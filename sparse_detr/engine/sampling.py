"""Data order and augmentation that depend only on (seed, epoch, index), so a run resumed in the
middle of an epoch sees exactly the batches, and the augmented images, it would have seen."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Sampler

SEED_SPACE = 2**64  # torch generators take seeds in [0, 2**64)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of one sample's augmentation, for any run seed (0 .. 2**63-1): wrapped
    into torch's range (small seeds keep the streams they always had; large ones cannot overflow)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % SEED_SPACE


class EpochSampler(Sampler[int]):
    """A shuffled order drawn from (seed, epoch), split across ranks, able to start mid-epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """skip: how many of this rank's samples of the epoch were already consumed."""
        self.epoch, self.skip = epoch, skip

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed + self.epoch) % SEED_SPACE)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world_size)
        order += order[: per_rank * self.world_size - self.size]  # pad by repeating, as DistributedSampler
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._shard()[self.skip:])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size) - self.skip


class SeededSamples(Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index), leaving
    the caller's random stream untouched (so data loading never shifts the dropout stream)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only, which the augmentation draws from: torch.manual_seed would also
            # (re)seed every accelerator, which costs more than the sample itself before CUDA is up.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]
