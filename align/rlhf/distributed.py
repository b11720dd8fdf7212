"""The online stages across processes (torchrun / accelerate launch): who samples what, and the collectives.

Data parallel, in the open: every rank holds the whole base with the adapters, samples and scores
its share of a step's prompts (whole groups: prompt i and its G samples stay on one rank), and
then every rank gathers the step's rollout (token ids, masks, rewards, log-probs: small next to
the model). From there each rank computes the same advantages and batch statistics over the
global batch, trains on its slice of each optimizer update, and the adapter gradients are summed
across ranks before the update, so every rank applies the same update and the run equals one
process that took the whole batch (tests/test_online_distributed.py).

Why not DDP's wrapper: the loss of a rank is its share of the global loss (its normalizers are
the global batch's), so the gradients are summed, not averaged; and ranks sample, score and
evaluate a different number of forward passes, which a wrapper that synchronizes in its forward
or backward hooks does not allow. Why not FSDP or ZeRO-3 sharding of the base: a rollout runs
the decoding loop, whose forward passes would each gather the sharded weights, and ranks whose
responses end early would have to keep running empty forwards to match the others. Under an FSDP
or DeepSpeed launch config the online stages run data parallel like this (logged); the base must
fit on one device (QLoRA makes a 4-bit base).

A single process (no launcher, or WORLD_SIZE=1) takes the same path with collectives that do nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("align")


def row_seed(*parts) -> int:
    """A 63-bit seed from its parts (seed, step, prompt index, sample index ...): the same on every process and run."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def launched_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes, and the collectives the online stages use."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- who does what ---------------------------------------------------------

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items; shares differ by at most one item (rank order)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    # -- collectives (no-ops for one process) ----------------------------------

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (tensors travel through the CPU)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, _to_cpu(obj))
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [_to_cpu(obj) if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: "torch.Tensor") -> "torch.Tensor":
        """The element-wise sum over ranks (in place, and returned)."""
        return self._reduce(values, "SUM")

    def max(self, values: "torch.Tensor") -> "torch.Tensor":
        return self._reduce(values, "MAX")

    def _reduce(self, values: "torch.Tensor", op: str) -> "torch.Tensor":
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(values, op=getattr(dist.ReduceOp, op))
        return values

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. a signal that reached one rank first)."""
        if self.size == 1:
            return flag
        import torch

        return bool(self.max(torch.tensor([int(flag)], device=_device())).item())

    def sum_gradients(self, params: list["torch.nn.Parameter"]) -> None:
        """Each parameter's gradient summed over ranks, in one flat all-reduce (a missing gradient counts as 0)."""
        if self.size == 1:
            return
        import torch

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def _device():
    """The device collectives run on: the rank's GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_cpu(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def world() -> World:
    """The current World: the initialized process group's, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


# What `accelerate launch` sets for an FSDP or DeepSpeed config; accelerate and the HF Trainer read them.
SHARDING_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def start(stage: str) -> World:
    """The World of an online stage: joins the launcher's process group (accelerate's PartialState picks
    gloo on CPUs, NCCL on GPUs and this rank's device); one process needs none.

    Under an FSDP or DeepSpeed launch config the stage runs data parallel: the flags that would make
    accelerate (and online DPO's HF Trainer) shard the model or start DeepSpeed are taken out of this
    process's environment, and the log says so.
    """
    kinds = [kind for flag, kind in SHARDING_FLAGS.items() if os.environ.pop(flag, "false").lower() == "true"]
    if kinds:
        log.info("%s: the launch config asks for %s; the online stages run data parallel (every rank holds the base and the "
                 "adapters; adapter gradients are summed across ranks); the base is not sharded (align/rlhf/distributed.py "
                 "says why)", stage, kinds[0])
    if launched_size() > 1:
        from accelerate import PartialState

        PartialState()
    return world()


def check_shards(size: int, count: int, key: str, *, what: str = "prompts per step", rows_per_prompt: int = 1,
                 rows_per_update: int | None = None, update_key: str = "train.batch_size") -> None:
    """Refusals before anything is written: `count` items (a step's prompts, whole groups of
    `rows_per_prompt` responses each) split evenly over `size` processes, and each rank's rows of a
    step fill whole updates of `rows_per_update` rows per rank."""
    if size == 1:
        return
    if count % size:
        raise ConfigError(f"{key}: {count} {what} do not split evenly over {size} processes (WORLD_SIZE); use a multiple of {size}")
    rows = count // size * rows_per_prompt
    if rows_per_update is not None and rows % rows_per_update:
        raise ConfigError(
            f"{update_key}: each of the {size} processes samples {rows} responses per step, which does not divide into "
            f"updates of {rows_per_update} responses per process ({update_key} is per process); "
            f"choose it so that {rows_per_update} divides {rows}"
        )
