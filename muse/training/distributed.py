"""Scale-out: the same `train()` under `torchrun` (one process per device, one or many nodes).

    torchrun --nproc-per-node 2 -m muse ...            # or: python -m torch.distributed.run ...

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group
(nccl on GPUs, gloo on CPUs) and picks this rank's device. `wrap()` puts the model in
DistributedDataParallel (default) or shards it with FSDP (`fully_shard`, per block and at the
root). Everything else in the loop is rank-aware through `DistEnv`: each rank draws its own rows
of the global batch (batch_size * grad_accum * world sequences per step), eval losses are
averaged over ranks, and only rank 0 writes checkpoints, metrics and plots.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device: str = "auto") -> DistEnv:
    """Join torchrun's process group if there is one; pick the device for this rank.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N".
    """
    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world, local_rank, dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        env.initialized_here = True
    return env


def teardown(env: DistEnv, synchronize: bool = True) -> None:
    """Leave the process group we joined. After an error, leave at once (peers may never arrive)."""
    if env.initialized_here and dist.is_initialized():
        if synchronize:
            dist.barrier()  # leave together: a rank tearing gloo down under a busy peer can abort
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, strategy: str = "ddp") -> nn.Module:
    """The model as the training step calls it: DDP or FSDP-sharded across ranks, or as is."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed must be one of {STRATEGIES}, got {strategy!r}")
    if not env.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each block, then the root (embeddings, final norm, head): parameters are
        # gathered one block at a time in forward/backward.
        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(module: nn.Module, skip: bool):
    """Skip the gradient sync on accumulation micro-steps: DDP's all-reduce, FSDP2's reduce-scatter."""
    inner = getattr(module, "_orig_mod", module)
    if skip and isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    if skip and hasattr(inner, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only at the last micro-step
        inner.set_requires_gradient_sync(False)
        return _resume_sync(inner)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _resume_sync(module):
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The average of a scalar tensor over all ranks (itself when not distributed)."""
    if not env.distributed:
        return value
    value = value.detach().to(env.device, torch.float64).clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# -- FSDP checkpoints: full (unsharded) state gathered to rank 0 -----------------------------------

def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on rank 0's CPU (empty on other ranks). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state (keyed by parameter name) on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full optimizer state (every rank passes the same full state) into `optimizer`. Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_full_options())
