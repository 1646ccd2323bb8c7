"""The soak tier runs only when selected (``make soak``: ``pytest -m soak``);
a plain ``pytest`` run lists it as skipped instead of spending minutes."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    if "soak" in markexpr and "not soak" not in markexpr:
        return
    skip = pytest.mark.skip(reason="soak: run with `make soak` (pytest -m soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)
