"""Samplers that make every sample's augmentation reproducible across resumes and world sizes.

Each training epoch is one *global* list of dataset indices (a seeded shuffle, optionally with
every index repeated), dealt round-robin to the ranks: rank ``r`` of ``R`` takes global positions
``r, r + R, r + 2R, ...``. Every yielded item is ``(index, sample_seed)`` where
``sample_seed = sample_seed_for(seed, epoch, global_position)``, so a given global sample gets the
same image *and* the same augmentation whatever the world size, and resuming mid-epoch
(``set_start``) replays exactly the samples an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler


def _mix(*values: int) -> int:
    """A well-spread 63-bit integer from a few ints (stable across runs and platforms)."""
    packed = struct.pack(f"<{len(values)}Q", *(v & 0xFFFF_FFFF_FFFF_FFFF for v in values))
    digest = hashlib.blake2b(packed, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seed_for(seed: int, epoch: int, position: int) -> int:
    """Seed of the augmentation for global ``position`` of ``epoch``."""
    return _mix(seed, epoch, position, 1)


def _check_len(dataset_len) -> int:
    n = len(dataset_len) if isinstance(dataset_len, Sized) else dataset_len
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a sampler needs a non-empty dataset; got length {n!r}")
    return n


def _check_world(num_replicas: int, rank: int) -> None:
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")


class _GlobalEpochSampler(Sampler):
    """Shared machinery: a global epoch list of ``num_repeats`` consecutive copies of each
    shuffled index, wrapped around when the ranks need more positions than it has."""

    def __init__(self, dataset_len, num_replicas: int = 1, rank: int = 0, num_repeats: int = 1,
                 shuffle: bool = True, seed: int = 0):
        self.dataset_len = _check_len(dataset_len)
        _check_world(num_replicas, rank)
        if not isinstance(num_repeats, int) or num_repeats < 1:
            raise ValueError(f"num_repeats must be a positive int, got {num_repeats!r}")
        self.num_replicas, self.rank, self.num_repeats = num_replicas, rank, num_repeats
        self.shuffle, self.seed = shuffle, int(seed)
        self.epoch, self.start = 0, 0

    @property
    def epoch_length(self) -> int:
        """Samples this rank yields in a full epoch (the same on every rank)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Begin ``epoch`` at its first sample (call :meth:`set_start` after this to resume)."""
        self.epoch, self.start = int(epoch), 0

    def set_start(self, position: int) -> None:
        """Skip this rank's first ``position`` samples of the current epoch (mid-epoch resume:
        ``position`` = samples this rank already consumed, e.g. batches_done * batch_size)."""
        if not isinstance(position, int) or not 0 <= position <= self.epoch_length:
            raise ValueError(f"start position must be an int in [0, {self.epoch_length}] "
                             f"(this rank's epoch length), got {position!r}")
        self.start = position

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0))
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def global_positions(self) -> range:
        """This rank's remaining global positions in the epoch list."""
        first = self.rank + self.num_replicas * self.start
        last = self.rank + self.num_replicas * self.epoch_length
        return range(first, last, self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._permutation()
        cycle = self.dataset_len * self.num_repeats
        for position in self.global_positions():
            index = order[(position % cycle) // self.num_repeats]
            yield index, sample_seed_for(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.epoch_length - self.start

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(dataset_len={self.dataset_len}, "
                f"num_replicas={self.num_replicas}, rank={self.rank}, "
                f"num_repeats={self.num_repeats}, shuffle={self.shuffle}, seed={self.seed})")


class RepeatAugSampler(_GlobalEpochSampler):
    """DeiT's repeated-augmentation sampler (RASampler).

    Each shuffled index appears ``num_repeats`` (3) times in a row in the global list, so with
    several ranks its copies go to different ranks and get different augmentations. As in DeiT
    only part of that list is used per epoch: each rank yields
    ``floor((N // 256) * 256 / num_replicas)`` samples, i.e. about ``N`` samples over all ranks
    (about ``N / num_repeats`` distinct images, each ``num_repeats`` times).

    Kept from DeiT: the consecutive repeats, the round-robin split, the wrap-around padding,
    the per-rank epoch length. Changed: the shuffle is seeded by ``(seed, epoch)`` (DeiT: epoch
    only); when DeiT's length is 0 (fewer than 256 images, or more ranks than ``N // 256 * 256``)
    each rank yields ``ceil(N / num_replicas)`` instead, so small (demo) datasets still train.
    """

    def __init__(self, dataset_len, num_replicas: int = 1, rank: int = 0, num_repeats: int = 3,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(dataset_len, num_replicas, rank, num_repeats, shuffle, seed)

    @property
    def epoch_length(self) -> int:
        deit_length = int(math.floor(self.dataset_len // 256 * 256 / self.num_replicas))
        return deit_length or math.ceil(self.dataset_len / self.num_replicas)


class DistributedTrainSampler(_GlobalEpochSampler):
    """Plain shuffled sharding (``num_repeats=1``): each rank yields ``ceil(N / num_replicas)``
    samples; the global list wraps around to pad the last round, like torch's
    DistributedSampler."""

    def __init__(self, dataset_len, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(dataset_len, num_replicas, rank, 1, shuffle, seed)

    @property
    def epoch_length(self) -> int:
        return math.ceil(self.dataset_len / self.num_replicas)


def build_train_sampler(dataset_len, num_replicas: int = 1, rank: int = 0, num_repeats: int = 3,
                        shuffle: bool = True, seed: int = 0) -> _GlobalEpochSampler:
    """RepeatAugSampler when ``num_repeats > 1``, else DistributedTrainSampler."""
    if num_repeats > 1:
        return RepeatAugSampler(dataset_len, num_replicas, rank, num_repeats, shuffle, seed)
    return DistributedTrainSampler(dataset_len, num_replicas, rank, shuffle, seed)


class DistributedEvalSampler(Sampler):
    """Contiguous shards that cover every index exactly once across ranks (no padding, no
    duplicates): rank ``r`` gets ``range(r * N // R, (r + 1) * N // R)``. Shard sizes differ by
    at most one (and can be 0 when N < R), so reduce sums and counts, not per-rank means."""

    def __init__(self, dataset_len, num_replicas: int = 1, rank: int = 0):
        self.dataset_len = len(dataset_len) if isinstance(dataset_len, Sized) else dataset_len
        if not isinstance(self.dataset_len, int) or self.dataset_len < 0:
            raise ValueError(f"dataset length must be an int >= 0, got {self.dataset_len!r}")
        _check_world(num_replicas, rank)
        self.num_replicas, self.rank = num_replicas, rank
        self.first = rank * self.dataset_len // num_replicas
        self.last = (rank + 1) * self.dataset_len // num_replicas

    def set_epoch(self, epoch: int) -> None:
        """No-op (evaluation order does not depend on the epoch)."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.first, self.last))

    def __len__(self) -> int:
        return self.last - self.first

    def __repr__(self) -> str:
        return (f"DistributedEvalSampler(dataset_len={self.dataset_len}, "
                f"num_replicas={self.num_replicas}, rank={self.rank})")
