"""Sharded checkpoints (zero_stage >= 1): DCP per rank, per-rank hashing, a manifest written last.

    step_000000120/
        .metadata            DCP's index of every tensor's global shape and where its pieces are
        __<rank>_0.distcp    rank <rank>'s shards of the model and the AdamW state
        trainer_state.json   counters, "format": "dcp", world size (rank 0)
        scheduler.pt rng.pt config.json                                  (rank 0)
        manifest.json        last: sha256 of every file above

Save: every rank takes the model and optimizer state through
`torch.distributed.checkpoint.state_dict.get_state_dict` (FQN-keyed, sharded DTensors; a plain
`optimizer.state_dict()` would be keyed by position and restore nothing), and writes it with
`dcp.async_save` into the same staging directory over a gloo group of its own (the training
collectives never queue behind a write). The call blocks only while the state is copied to
host memory. In the background each rank hashes the files it wrote; rank 0 adds its small
files, gathers every rank's hashes over the checkpoint group and commits the directory with
`controlplane.checkpoint.commit` (manifest last, fsync, atomic rename). A write that fails on
any rank fails on all of them (DCP gathers the error) and nothing is committed.

Load: the same two state dicts are built for this rank's model and optimizer, `dcp.load`
fills this rank's pieces from whatever shards the writers had (N writers, M readers: DCP
reshards by global offsets), and `set_state_dict` puts them in place.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from controlplane import checkpoint as ckpt
from jobs.pretrain import state as st

FORMAT = "dcp"
WriteFailed = (Exception, CheckpointException)  # DCP's error is a BaseException


def model_and_optim(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


class _FullDiskWriter(FileSystemWriter):
    """The checkpoint_enospc drill: this rank's write fails part-way as on a full disk."""

    def write_data(self, plan, planner):
        part = Path(self.path) / f"__{dist.get_rank()}_0.distcp"
        with open(part, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(part))


@dataclass
class Pending:
    """A save whose tensors are copied to host memory and being written."""

    step: int
    staging: Path
    future: Any  # None for a synchronous save (already written)


@functools.cache
def pinned_stager() -> Any:
    """One stager for the worker's life on a GPU: the state is copied device-to-host into pinned
    buffers, which its next saves reuse (DCP's default stager copies into pageable memory that
    each save allocates anew). Staging stays synchronous at the step boundary; the write runs
    in the background."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    options = StagingOptions(
        use_pinned_memory=True, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
    )
    return DefaultStager(options)


def start_save(
    staging: Path, model, optimizer, group: Any, *, async_save: bool, fail_enospc: bool, step: int
) -> Pending:
    """Every rank, at the step boundary: stage the state and start (or, sync, do) the DCP write."""
    staging.mkdir(parents=True, exist_ok=True)
    state = model_and_optim(model, optimizer)
    writer = (_FullDiskWriter if fail_enospc else FileSystemWriter)(str(staging))
    if async_save:
        on_gpu = any(p.is_cuda for p in model.parameters())
        stager = {"async_stager": pinned_stager()} if on_gpu else {}
        return Pending(step, staging, dcp.async_save(state, storage_writer=writer, process_group=group, **stager))
    dcp.save(state, storage_writer=writer, process_group=group)
    return Pending(step, staging, None)


def finish_save(
    pending: Pending,
    group: Any,
    root: Path,
    meta: dict[str, Any],
    sidecar: Callable[[Path], None] | None,
) -> ckpt.CheckpointInfo | None:
    """Every rank, in the background: wait for the write, hash own files, gather, rank 0 commits.

    `sidecar` (rank 0 only) writes the small files. Returns the committed checkpoint on rank 0;
    raises on every rank if any rank's write failed (the staging directory is then removed).
    """
    rank = dist.get_rank(group)
    error = None
    files: dict[str, dict[str, Any]] = {}
    try:
        if pending.future is not None:
            pending.future.result()
        if sidecar is not None:
            sidecar(pending.staging)
        own = sorted(pending.staging.glob(f"__{rank}_*.distcp"))
        files = ckpt.hash_files(pending.staging, own)
    except WriteFailed as exc:
        error = cause(exc)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (rank, files, error), group=group)
    errors = [e for _, _, e in gathered if e]
    if errors:
        if rank == 0:
            import shutil

            shutil.rmtree(pending.staging, ignore_errors=True)
        raise OSError(errno.EIO, f"sharded checkpoint write failed: {errors[0]}")
    if rank != 0:
        return None
    merged: dict[str, dict[str, Any]] = {}
    for _, f, _ in gathered:
        merged.update(f)
    return ckpt.commit(pending.staging, root, pending.step, meta, hashed=merged)


def cause(exc: BaseException) -> str:
    """One line: a rank's own error inside DCP's CheckpointException, else the exception."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {type(inner).__name__}: {str(inner).splitlines()[0][:300]}"
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def write_sidecar(staging: Path, scheduler_state: dict, rng: dict, counters: dict, config: dict, extra: dict) -> None:
    """Rank 0's small files: trainer counters, LR scheduler, RNG, model config."""
    torch.save(scheduler_state, staging / "scheduler.pt")
    torch.save(rng, staging / st.RNG_FILE)
    (staging / st.CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    trainer = {**st.trainer_record(counters), **extra, "format": FORMAT}
    (staging / st.TRAINER_FILE).write_text(json.dumps(trainer, indent=1, sort_keys=True))


def is_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file()


def load(path: Path, model, optimizer, scheduler) -> st.Counters:
    """Every rank: this rank's shards from a (verified) sharded checkpoint, any writer count."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = model_and_optim(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    st.set_rng_state(torch.load(path / st.RNG_FILE, weights_only=False))
    return st.counters_of(json.loads((path / st.TRAINER_FILE).read_text()))


# --------------------------------------------------------------------------- in-memory shards


def _leaves(obj: Any, path: tuple = ()) -> dict[tuple, Any]:
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in _leaves(item, (*path, key)).items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in _leaves(item, (*path, i)).items()}
    return {path: obj}


def local_state(model, optimizer, scheduler, counters: st.Counters) -> dict[str, Any]:
    """This rank's own shards of the model and AdamW state (plain local tensors, copied), the LR
    scheduler and the counters: what a rank at the same mesh position of another replica needs."""
    from torch.distributed.tensor import DTensor

    state = model_and_optim(model, optimizer)
    groups = copy.deepcopy(state["optim"].pop("param_groups", []))  # lr, betas, ...: as they are now
    local = {
        k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in _leaves(state).items()
        if isinstance(v, torch.Tensor)
    }
    return {
        "tensors": local,
        "param_groups": groups,
        "scheduler": scheduler.state_dict(),
        "counters": counters.as_dict(),
    }


def restore_local(snap: dict[str, Any], model, optimizer, scheduler) -> st.Counters:
    """Put `local_state`'s shards into a model and optimizer built for the same mesh position (the
    mesh itself may be new: a re-formed group); nothing is read from disk."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.tensor import DTensor

    state = model_and_optim(model, optimizer)  # initialises the AdamW state, so every leaf exists
    tensors = snap["tensors"]
    state["optim"]["param_groups"] = snap["param_groups"]
    for key, v in _leaves(state).items():
        if isinstance(v, torch.Tensor):
            (v.to_local() if isinstance(v, DTensor) else v).copy_(tensors[key])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(snap["scheduler"])
    c = snap["counters"]
    return st.Counters(**{**c, "loss_history": list(c["loss_history"])})
