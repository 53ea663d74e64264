"""Model construction and the training state: capture to host memory, persist, restore.

The state of a data-parallel replica is model weights, AdamW + LR-scheduler state, RNG
states and the trainer counters (step, tokens, data cursor, recent losses). `capture()`
deep-copies it to host memory (the only part of a checkpoint that blocks training);
`persist()` writes the contract's checkpoint layout into a staging directory;
`to_bytes`/`from_bytes` move it between replicas' memory for in-attempt recovery.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import random
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
    from transformers import LlamaConfig

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
        attention_dropout=0.0,
    )


def build_model(config: Any, seed: int, device: torch.device):
    """Same seed -> bitwise the same initial weights (fp32 master weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(device)


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


def _to_host(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state() -> dict[str, Any]:
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


def capture(model, optimizer, scheduler, counters: Counters) -> dict[str, Any]:
    """A deep copy of the whole replica state in host memory."""
    return {
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "optimizer": _to_host(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "rng": _to_host(rng_state()),
        "counters": copy.deepcopy(counters.as_dict()),
    }


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
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(staging / MODEL_FILE))
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    torch.save({"optimizer": state["optimizer"], "scheduler": state["scheduler"]}, staging / OPTIMIZER_FILE)
    torch.save(state["rng"], staging / RNG_FILE)
    c = state["counters"]
    trainer = {
        "step": c["step"],
        "tokens": c["tokens"],
        "loss": c["loss"],
        "data_cursor": c["cursor"],
        "loss_history": c["loss_history"],
        **extra,
    }
    (staging / TRAINER_FILE).write_text(json.dumps(trainer, indent=1, sort_keys=True))


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
