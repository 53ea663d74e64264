"""A module imported on its first use, not where it is named.

The driver creates the worker actors, so it defines `TrainWorker` (Ray needs the class object),
but it never runs it: with its imports deferred, a driver does not import torch, FSDP and DCP
(about 5 CPU-seconds a process, most of a driver's start), and a replicated rank never imports
DCP. The worker process imports each one at its first attribute access, the first thing its
constructor does. Python 3.15 spells this `lazy import torch` (PEP 810).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module `name`; the first attribute read imports it (once; then a lookup)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:  # only for names the proxy itself lacks
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r}, {state}>"


def lazy(name: str) -> Any:
    """`torch = lazy("torch")` instead of `import torch` (typed Any: it reads as the module)."""
    return LazyModule(name)
