"""Data-parallel quantization over several processes (torchrun): calibration batches are split across
ranks, every rank walks the same blocks on its own batches, and the statistics the solvers read
(H and QEP's C, block errors) are summed over the ranks, so every rank solves the same problem and the
result equals one process's up to the order of float sums. NCCL between GPUs, gloo on the CPU.

    torchrun --nproc-per-node 2 -m lowbit quantize MODEL --out DIR ...   (rank 0 writes)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


class DistributedError(RuntimeError):
    """The distributed run cannot go ahead as asked."""


@dataclass
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    backend: str
    sharded: tuple | None = None  # (windows, batch size, split_batches) of the last `shard`, for `unshard`

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files and prints results."""
        return self.rank == 0

    def device(self, spec: str) -> torch.device:
        """This rank's device for `--device spec` (cuda -> cuda:LOCAL_RANK)."""
        dev = torch.device(spec)
        if dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def shard(self, tokens: torch.Tensor, batch_size: int, split_batches: bool = False) -> torch.Tensor:
        """This rank's calibration windows: batches rank, rank + world, ... of the single-process batching
        (each batch is the same as in a one-process run; only the order of the sums changes). `split_batches`
        (block-wise training, whose optimiser steps once per batch): every batch is cut into `world` equal
        parts instead and this rank takes part `rank` of each, so that the ranks walk `batch_size / world`
        windows per batch and one step's gradient, averaged over the ranks (`mean_grads`), is the one-process
        gradient of that batch."""
        self.sharded = (tokens.shape[0], batch_size, split_batches)
        if split_batches:
            return self._split(tokens, batch_size)
        n_batches = -(-tokens.shape[0] // batch_size)
        if n_batches < self.world:
            raise DistributedError(f"{n_batches} calibration batches cannot be split over {self.world} processes; "
                                   "use more windows, a smaller --batch-size or fewer processes")
        mine = [tokens[b * batch_size : (b + 1) * batch_size] for b in range(self.rank, n_batches, self.world)]
        return torch.cat(mine)

    def _split(self, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
        n = tokens.shape[0]
        sizes = [min(batch_size, n - b) for b in range(0, n, batch_size)]
        if any(k % self.world for k in sizes):
            raise DistributedError(f"block-wise training over {self.world} processes cuts every calibration batch "
                                   f"into {self.world} equal parts; batches of {sorted(set(sizes))} windows cannot "
                                   "be; choose --batch-size and --n-calib multiples of the process count")
        mine = [tokens[b + self.rank * k // self.world: b + (self.rank + 1) * k // self.world]
                for b, k in zip(range(0, n, batch_size), sizes)]
        return torch.cat(mine)

    def unshard(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's windows of the last `shard` put back together in the one-process order (on the host;
        every rank gets them): for the steps that work on whole-model batches of their own (end-to-end
        distillation)."""
        import torch.distributed as dist

        if self.sharded is None:
            raise DistributedError("unshard before shard: nothing to put back together")
        n, bs, split = self.sharded
        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine.cpu())
        pos, out = [0] * self.world, []
        for b in range(-(-n // bs)):
            k = min(bs, n - b * bs)
            if split:          # rank r holds rows [r k / w, (r + 1) k / w) of every batch
                for r in range(self.world):
                    m = (r + 1) * k // self.world - r * k // self.world
                    out.append(parts[r][pos[r]:pos[r] + m])
                    pos[r] += m
            else:              # rank b mod w holds batch b whole
                r = b % self.world
                out.append(parts[r][pos[r]:pos[r] + k])
                pos[r] += k
        return torch.cat(out)

    def my_part(self, idx: list) -> list:
        """This rank's equal share of a list (a step's windows): the slice [rank n / w, (rank + 1) n / w)."""
        n = len(idx)
        return idx[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def mean_grads(self, tensors) -> None:
        """Average the gradients of `tensors` over the ranks, in place (every rank then holds the same)."""
        import torch.distributed as dist

        for t in tensors:
            if t.grad is not None:
                dist.all_reduce(t.grad)
                t.grad.div_(self.world)

    def total(self, value: float) -> float:
        """The sum of a float over the ranks (a token count, a loss weighted by a rank's share)."""
        import torch.distributed as dist

        dev = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return float(t[0])

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (a loss averaged over equal shares of a batch)."""
        return self.total(value) / self.world

    def all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a training step is taken on every rank or on none)."""
        return self.total(float(bool(flag))) == self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place; returns it."""
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def all_reduce_stats(self, stats, with_c: bool = True) -> None:
        """Sum QEPStat accumulators (H, with `with_c` C, token counts) over the ranks, in place; shared ones once."""
        import torch.distributed as dist

        seen: set[int] = set()
        for st in stats:
            if id(st) in seen:
                continue
            seen.add(id(st))
            dist.all_reduce(st.H)
            if with_c:
                dist.all_reduce(st.C)
            n = torch.tensor([st.tokens], dtype=torch.float64, device=st.H.device)
            dist.all_reduce(n)
            st.tokens = int(n.item())
            st._factors.clear()

    def rel_err(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        """Relative Frobenius error of stream a against b over every rank's batches."""
        import torch.distributed as dist

        num = sum(float((x - y).float().pow(2).sum()) for x, y in zip(a, b))
        den = sum(float(y.float().pow(2).sum()) for y in b)
        dev = a[0].device if a else torch.device("cpu")
        t = torch.tensor([num, den], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return (float(t[0]) / max(float(t[1]), 1e-30)) ** 0.5

    def barrier(self) -> None:
        """Wait for every rank."""
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def from_env(device: str) -> Dist | None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), or None for a
    single-process run. NCCL for CUDA devices, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        if torch.cuda.device_count() <= local:
            raise DistributedError(f"rank {rank} wants cuda:{local} but this machine has {torch.cuda.device_count()} "
                                   "GPU(s); use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local, backend)
