"""Where the model is built and parallelised: the one place FSDP2 is applied.

    model = build(config, seed, device, parallelism, mesh)

- The model is built on the meta device (no memory), activation checkpointing wraps the
  decoder layers it applies to, and for `zero_stage` >= 1 `fully_shard` is called once per
  decoder layer and once on the root over the data-parallel mesh: a 1-D mesh (shard over
  every worker) or, with `replicate` > 1, a 2-D (replicate, shard) mesh (HSDP: reduce-scatter
  inside a replica group, all-reduce across groups). Stages 1 and 2 keep the unsharded weights
  from forward to backward (`reshard_after_forward=False`); stage 3 frees them after each
  layer's forward. Only then is memory allocated: each rank materialises its own shards.
- Initial weights depend only on the seed and the parameter's name, never on the world or the
  stage: every parameter's full value is drawn from its own seeded generator on the host, one
  parameter at a time, and each rank keeps its slice. A run on 1, 2 or 8 workers, replicated
  or sharded, starts from the same weights.
- Mixed precision on a GPU: bf16 parameters for compute, fp32 gradient reduction and fp32
  sharded master weights (`MixedPrecisionPolicy`); on a CPU everything is fp32.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from controlplane.spec import ParallelismSpec
from jobs.pretrain.llama import INITIALIZER_RANGE, LlamaForCausalLM, LlamaRotaryEmbedding

INIT_STD = INITIALIZER_RANGE
_WRAPPED = "_checkpoint_wrapped_module."


def data_mesh(world: int, par: ParallelismSpec, device_type: str) -> Any:
    """The data-parallel DeviceMesh of a sharded run (None for zero_stage 0)."""
    if par.zero_stage == 0:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if par.replicate > 1:
        if world % par.replicate:
            raise ValueError(f"parallelism.replicate ({par.replicate}) does not divide the world ({world})")
        return init_device_mesh(
            device_type, (par.replicate, world // par.replicate), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> int:
    """Wrap decoder layers in `checkpoint_wrapper` ('full': every one, 'selective': every second)."""
    if mode == "none":
        return 0
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    every = 1 if mode == "full" else 2
    wrapped = 0
    for i in range(len(layers)):
        if i % every == 0:
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
            wrapped += 1
    return wrapped


def mixed_precision(device: torch.device, precision: str) -> Any:
    """bf16 compute with fp32 reduction on a GPU (unless fp32 is asked for); None (fp32) on a CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(model: torch.nn.Module, mesh: Any, zero_stage: int, mp: Any) -> None:
    """`fully_shard` per decoder layer, then the root (embeddings, final norm, output head)."""
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": zero_stage >= 3}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def build(config: Any, seed: int, device: torch.device, par: ParallelismSpec, mesh: Any, precision: str = "auto"):
    """The model, parallelised as `par` says, its local part materialised on `device` and seeded."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    apply_activation_checkpointing(model, par.activation_checkpointing)
    if par.zero_stage >= 1:
        apply_fsdp(model, mesh, par.zero_stage, mixed_precision(device, precision))
    model.to_empty(device=device)
    init_weights(model, seed)
    _reset_buffers(model)
    return model


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Each parameter's full initial value from its own generator; each rank keeps its slice."""
    for name, p in model.named_parameters():
        clean = name.replace(_WRAPPED, "")
        shape = tuple(p.shape)  # a DTensor's global shape
        if "norm" in clean:
            full = torch.ones(shape)
        else:
            gen = torch.Generator().manual_seed(param_seed(seed, clean))
            full = torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)
        with torch.no_grad():
            local_of(p).copy_(slice_like(full, p))


def local_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a parameter (its shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def slice_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` laid out as the (possibly sharded) tensor `like`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.dtype)
    dt = distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return dt.to_local()


def _reset_buffers(model: torch.nn.Module) -> None:
    """Buffers a meta build leaves empty (the rotary inverse frequencies)."""
    for m in model.modules():
        if isinstance(m, LlamaRotaryEmbedding):
            with torch.no_grad():
                m.reset_buffers()


def set_gradient_sync(model: torch.nn.Module, zero_stage: int, last_micro: bool) -> None:
    """Stage 1 reduces gradients on the last micro-batch only; 2 and 3 on every one (kept sharded)."""
    if zero_stage >= 1:
        model.set_requires_gradient_sync(last_micro or zero_stage >= 2)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient-norm clip over (possibly sharded) gradients; returns the norm before it."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, True)
    return float(total)


def average(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a scalar over every rank (the default process group)."""
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value
