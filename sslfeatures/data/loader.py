"""The training-time batch stream: seeded per-epoch order, exact mid-epoch resume.

Small data sets (the decoded ``uint8`` tensor fits in ``cache_bytes``) are decoded once
into memory and batches are index slices; larger ones stream through a multi-worker
``DataLoader``. Either way the order of epoch ``e`` is a permutation drawn from
``seed + e``, so a resumed run sees exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .sources import BadFileReport, ImageSource, default_workers, load_into_memory


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


class _OrderSampler(Sampler[int]):
    def __init__(self, order: torch.Tensor):
        self.order = order

    def __iter__(self):
        return iter(self.order.tolist())

    def __len__(self) -> int:
        return len(self.order)


class TrainStream:
    """Batches of ``uint8`` images (B,3,S,S) for training, ``drop_last`` semantics.

    Parameters
    ----------
    source: the decoded image source.
    batch_size: images per step (per process under DDP).
    seed: base seed of the per-epoch permutation.
    cache_bytes: decode everything into RAM when it fits (``0`` disables).
    rank, world_size: this process's shard of every epoch (DDP).
    """

    def __init__(self, source: ImageSource, batch_size: int, seed: int = 0,
                 cache_bytes: int = 4 << 30, num_workers: int | None = None,
                 report: BadFileReport | None = None, rank: int = 0, world_size: int = 1,
                 progress: bool = True):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.report = report if report is not None else BadFileReport()
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.rank, self.world_size = rank, world_size
        need = len(source) * 3 * source.size * source.size
        self.memory: torch.Tensor | None = None
        if need <= cache_bytes:
            self.memory, _ = load_into_memory(source, self.report, self.num_workers, progress)
            self.n = len(self.memory)
        else:
            self.n = len(source)
        global_batch = batch_size * world_size
        if self.n < global_batch:
            raise ValueError(
                f"only {self.n} usable images for a batch of {global_batch}: lower batch_size "
                f"or add images")
        self.steps_per_epoch = self.n // global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Yield the batches of ``epoch`` from batch ``start_step`` on."""
        perm = epoch_permutation(self.n, self.seed, epoch)
        gb = self.batch_size * self.world_size
        perm = perm[: self.steps_per_epoch * gb].view(self.steps_per_epoch, self.world_size, self.batch_size)
        perm = perm[start_step:, self.rank]  # (steps, B)
        if self.memory is not None:
            for idx in perm:
                yield self.memory[idx]
            return
        # streaming: decode with workers; a bad file shrinks its batch, the next files refill it
        loader = DataLoader(self.source, batch_size=None, sampler=_OrderSampler(perm.reshape(-1)),
                            num_workers=self.num_workers, collate_fn=None,
                            prefetch_factor=4 if self.num_workers else None)
        buf: list[torch.Tensor] = []
        produced = 0
        for img, index, err in loader:
            if img is None:
                self.report.add(self.source.describe(int(index)), err)
                continue
            buf.append(img)
            if len(buf) == self.batch_size:
                yield torch.stack(buf)
                buf = []
                produced += 1
        if buf and produced < len(perm):
            # fewer batches because of bad files: pad the last one by repetition
            while len(buf) < self.batch_size:
                buf.append(buf[len(buf) % max(1, len(buf))])
            yield torch.stack(buf)
