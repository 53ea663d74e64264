"""Test fixtures shared by every tier.

Every test gets its own LLMCTL_HOME (storage root and ledger), so nothing touches the
user's ~/.llmctl and tests never see each other's runs.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def llmctl_home(tmp_path, monkeypatch):
    home = tmp_path / "llmctl-home"
    home.mkdir()
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    monkeypatch.delenv("LLMCTL_CLUSTER", raising=False)
    return home
