"""Fixtures of the compression tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def compression_on_one_thread(one_thread):
    """Every compression test module runs torch on one thread (the shared ``one_thread`` fixture)."""
    yield
