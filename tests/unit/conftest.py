"""Unit tests run in seconds; one that waits a minute is stuck, and fails then rather than at the suite's limit."""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT_TIMEOUT_S = 90
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:  # the hook sees the whole session's items, not only this directory's
        if item.path.is_relative_to(HERE) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_S))
