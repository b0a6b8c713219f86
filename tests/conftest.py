"""Suite-wide set-up: what every test module shares."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from garbage import collect_garbage

_BYTECODE = "PYTHONDONTWRITEBYTECODE"
_PREFIX = "PYTHONPYCACHEPREFIX"
_pycache: str | None = None
_bytecode_setting = ""  # the caller's PYTHONDONTWRITEBYTECODE, put back at the end


def pytest_configure(config: pytest.Config) -> None:
    """Where bytecode may not be written beside the sources, let the processes the suite starts
    share it in a temporary folder instead. Otherwise every rank of every `mpiexec` compiles
    civetta from source (`tests/test_zero.py` in a fresh clone: 104 s, 78 s with the shared
    folder). The folder is removed when the session ends; the sources and the caller's
    environment stay as they were."""
    global _pycache, _bytecode_setting
    if os.environ.get(_BYTECODE) and _PREFIX not in os.environ:
        _pycache = tempfile.mkdtemp(prefix="civetta-pycache-")
        os.environ[_PREFIX] = _pycache
        _bytecode_setting = os.environ.pop(_BYTECODE)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _pycache
    if _pycache is not None:
        shutil.rmtree(_pycache, ignore_errors=True)
        os.environ.pop(_PREFIX, None)
        os.environ[_BYTECODE] = _bytecode_setting
        _pycache = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported, before the first test that collects garbage."""
    collect_garbage()
