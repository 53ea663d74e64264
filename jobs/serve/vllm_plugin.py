"""llmctl's vLLM plugin (entry point group `vllm.general_plugins`, see pyproject.toml).

vLLM calls every general plugin in each process it runs a model in: the caller, the engine
core it spawns, and the workers. `register` must stay cheap and safe to call more than once.
"""

from __future__ import annotations


def register() -> None:
    """Ask Linux for the AMX tile state before vLLM's CPU kernels use it.

    On a CPU with AMX, vLLM's CPU backend runs bf16 attention on its AMX kernel (its choice
    rests on `torch.cpu._is_amx_tile_supported()`, which reads CPUID). Linux lets a process
    execute tile instructions only once it has asked (arch_prctl ARCH_REQ_XCOMP_PERM); vLLM
    does not ask, so a spawned engine core dies of SIGILL on its first bf16 request.
    `torch.cpu._init_amx()` asks, for the calling process; it is a no-op without AMX.
    """
    import torch

    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        torch.cpu._init_amx()
