"""Suite-wide set-up: what every test module shares."""

from __future__ import annotations

import pytest
from garbage import collect_garbage


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported, before the first test that collects garbage."""
    collect_garbage()
