"""Model construction and the training state: stage to host memory, persist, restore.

The state of a data-parallel replica is model weights, AdamW + LR-scheduler state, RNG
states and the trainer counters (step, tokens, data cursor, recent losses).

An async checkpoint (`HostStaging`) records the RNG state at the step boundary, then copies
the rest into reusable host buffers (pinned on a GPU) while the next step's forward and
backward run: neither changes the weights, the optimizer, the scheduler or the counters, and
the training loop waits (`guard()`) before its optimizer step only if the copy is not done.
`persist()` then writes the contract's checkpoint layout from the buffers in the background.
A synchronous save writes from the live tensors (`live_state()`).

`capture()` is a plain deep copy used to move state between replicas' memory
(`to_bytes`/`from_bytes`) for in-attempt recovery.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlplane.spec import LlamaDims, RunSpec
from jobs.pretrain.schedule import lr_factor

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"


def llama_config(dims: LlamaDims, bos_id: int | None = None, eos_id: int | None = None):
    from jobs.pretrain.llama import LlamaConfig

    return LlamaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.ffn_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        max_position_embeddings=dims.max_seq_len,
        tie_word_embeddings=dims.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def build_model(config: Any, seed: int, device: torch.device):
    """A replicated model (zero_stage 0): same seed -> bitwise the same initial weights (fp32), the
    same ones a sharded build starts from (see `parallelize.init_weights`)."""
    from controlplane.spec import ParallelismSpec
    from jobs.pretrain.parallelize import build

    return build(config, seed, device, ParallelismSpec(), None)


def build_optimizer(model: torch.nn.Module, run: RunSpec, total_steps: int):
    sched = run.train.schedule
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": sched.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=sched.lr,
        betas=tuple(sched.betas),
        eps=1e-8,
        foreach=True,
    )

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=sched.warmup_steps,
            total_steps=total_steps,
            decay=sched.decay,
            min_ratio=sched.min_lr_ratio,
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, scheduler


@dataclass
class Counters:
    step: int = 0  # completed global steps
    tokens: int = 0  # tokens trained in the run, including before resume
    cursor: int = 0  # next batch index (data position)
    loss: float | None = None
    loss_history: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(
            step=self.step, tokens=self.tokens, cursor=self.cursor, loss=self.loss, loss_history=self.loss_history
        )


def rng_state() -> dict[str, Any]:
    """Fresh copies of every RNG state (each getter returns a new object)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state(
    model, optimizer, scheduler, counters: Counters, tensor: Callable[[tuple, torch.Tensor], torch.Tensor], rng=None
) -> dict[str, Any]:
    """The replica state in the checkpoint's shape; each tensor is `tensor(path, t)`, the rest copied."""
    return {
        "model": _map_tensors(model.state_dict(), tensor, ("model",)),
        "optimizer": _map_tensors(optimizer.state_dict(), tensor, ("optimizer",)),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "rng": rng if rng is not None else rng_state(),
        "counters": copy.deepcopy(counters.as_dict()),
    }


def capture(model, optimizer, scheduler, counters: Counters) -> dict[str, Any]:
    """A deep copy of the whole replica state in host memory."""
    return _state(model, optimizer, scheduler, counters, lambda _, t: t.detach().to("cpu", copy=True))


def live_state(model, optimizer, scheduler, counters: Counters) -> dict[str, Any]:
    """The state without copying tensors: for a synchronous save, written before training goes on."""
    return _state(model, optimizer, scheduler, counters, lambda _, t: t.detach().cpu())


_ATOMS = (int, float, str, bool, type(None))


def _map_tensors(obj: Any, fn: Callable[[tuple, torch.Tensor], torch.Tensor], path: tuple = ()) -> Any:
    """Rebuild a state_dict-like structure, tensors replaced by fn(path, tensor), the rest copied."""
    if isinstance(obj, torch.Tensor):
        return fn(path, obj)
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn, (*path, i)) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


class HostStaging:
    """Reusable host buffers a checkpoint is copied into while training goes on.

    One snapshot at a time; the caller persists it (reading the buffers) before it stages the
    next. Until the training loop passes `guard()` (just before its optimizer step) nothing in
    the snapshot changes except the RNG state, so:
    - `stage()` (the save call, at the step boundary) records only the RNG state;
    - `fill()` (writer thread) builds the state with its tensors in the buffers: on a CPU it
      copies them; on a GPU it queues device-to-host copies on a side stream, then waits;
    - `guard()` waits until the copies are done (CPU) or queued (GPU: the compute stream then
      waits for them, the host does not), and records how long training was held;
    - `release()` says no training step follows before the next `stage()` (end of attempt).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._parts: tuple | None = None
        self._rng: dict[str, Any] | None = None
        self._ready = threading.Event()  # copies done (CPU) or queued (GPU): the update may go on
        self._ready.set()
        self._released = threading.Event()
        self._released.set()
        self._cuda_event: Any = None
        self._stream: Any = None
        self.stall_s = 0.0
        self.error: BaseException | None = None

    def stage(self, model, optimizer, scheduler, counters: Counters) -> None:
        if not self._ready.is_set() or not self._released.is_set():
            raise RuntimeError("the previous snapshot is still being staged")
        self._parts = (model, optimizer, scheduler, counters)
        self._rng = rng_state()  # the next forward may draw random numbers: taken now
        self.stall_s, self.error, self._cuda_event = 0.0, None, None
        self._ready.clear()
        self._released.clear()

    def fill(self) -> dict[str, Any]:
        """Writer thread: the staged state, its tensors copied into the host buffers."""
        if self._parts is None:
            raise RuntimeError("nothing staged")
        model, optimizer, scheduler, counters = self._parts
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def to_buffer(path: tuple, t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            buf = self._buffers.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self._buffers[path] = buf
            pairs.append((buf, t))
            return buf

        try:
            state = _state(model, optimizer, scheduler, counters, to_buffer, rng=self._rng)
            device = next((src.device for _, src in pairs if src.is_cuda), None)
            if device is None:
                for buf, src in pairs:
                    buf.copy_(src)
                return state
            self._stream = self._stream or torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.default_stream(device))  # behind the last update
            with torch.cuda.stream(self._stream):
                for buf, src in pairs:
                    buf.copy_(src, non_blocking=True)
            self._cuda_event = self._stream.record_event()
            self._ready.set()
            self._cuda_event.synchronize()
            return state
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._parts = None
            self._ready.set()

    def guard(self) -> float:
        """Training loop, before the state changes: wait for the copy if it is not done yet."""
        if self._released.is_set():
            return 0.0
        t0 = time.perf_counter()
        self._ready.wait()
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)
        self.stall_s = time.perf_counter() - t0
        self._released.set()
        return self.stall_s

    def release(self) -> None:
        """No training step follows until the next `stage()`: nothing waits on the copy."""
        self._released.set()

    def wait_released(self) -> float:
        """Writer thread: block until training passed its guard (or was released); the stall."""
        self._released.wait()
        return self.stall_s


def restore(state: dict[str, Any], model, optimizer, scheduler) -> Counters:
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state["model"].items()}, strict=True)
    optimizer.load_state_dict(state["optimizer"])  # moves state tensors to the params' device
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    c = state["counters"]
    return Counters(
        step=c["step"], tokens=c["tokens"], cursor=c["cursor"], loss=c.get("loss"), loss_history=list(c["loss_history"])
    )


def to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=False)


def broadcast_bytes(data: bytes | None, src: int, device: torch.device, group: Any = None) -> bytes:
    """`data` from global rank `src` to every rank of `group` (the default group if None): its
    size, then the bytes. The source passes its bytes, the others None."""
    import torch.distributed as dist

    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src, group=group)
    return data if data is not None else buf.cpu().numpy().tobytes()


class InjectedENOSPC(OSError):
    pass


def persist(
    state: dict[str, Any], staging: Path, *, config: dict[str, Any], extra: dict[str, Any], fail_enospc: bool = False
) -> None:
    """Write the contract's checkpoint files into `staging` (commit happens elsewhere)."""
    from safetensors.torch import save_file

    if fail_enospc:  # the drill fails the real write path part-way through the weights file
        with open(staging / MODEL_FILE, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(staging / MODEL_FILE))
    save_file(_unshared(state["model"]), str(staging / MODEL_FILE))
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    torch.save({"optimizer": state["optimizer"], "scheduler": state["scheduler"]}, staging / OPTIMIZER_FILE)
    torch.save(state["rng"], staging / RNG_FILE)
    trainer = {**trainer_record(state["counters"]), **extra}
    (staging / TRAINER_FILE).write_text(json.dumps(trainer, indent=1, sort_keys=True))


def trainer_record(c: dict[str, Any]) -> dict[str, Any]:
    """`trainer_state.json`'s counters from `Counters.as_dict()`."""
    return {
        "step": c["step"],
        "tokens": c["tokens"],
        "loss": c["loss"],
        "data_cursor": c["cursor"],
        "loss_history": c["loss_history"],
    }


def counters_of(trainer: dict[str, Any]) -> Counters:
    return Counters(
        step=trainer["step"],
        tokens=trainer["tokens"],
        cursor=trainer["data_cursor"],
        loss=trainer.get("loss"),
        loss_history=list(trainer.get("loss_history", [])),
    )


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings written from live weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def load(path: Path) -> dict[str, Any]:
    """Read a committed (already verified) checkpoint back into the in-memory state form."""
    from safetensors.torch import load_file

    opt = torch.load(path / OPTIMIZER_FILE, weights_only=False)
    trainer = json.loads((path / TRAINER_FILE).read_text())
    return {
        "model": load_file(str(path / MODEL_FILE)),
        "optimizer": opt["optimizer"],
        "scheduler": opt["scheduler"],
        "rng": torch.load(path / RNG_FILE, weights_only=False),
        "counters": {
            "step": trainer["step"],
            "tokens": trainer["tokens"],
            "cursor": trainer["data_cursor"],
            "loss": trainer.get("loss"),
            "loss_history": trainer.get("loss_history", []),
        },
    }
