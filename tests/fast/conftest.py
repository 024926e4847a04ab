"""The fast layer: pure tests of the gateway's parts, without Ray, in seconds (``pytest -m fast``).

Every test in this folder is marked ``fast``. None may use the session's Ray cluster: a test here
that asks for ``ray_head`` (directly, or through ``app``, ``client``, ``deploy`` ...) is an error
at collection, not a silent minute spent starting a cluster.
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
#: fixtures of tests/conftest.py that start Ray (the others that need it ask for one of these)
RAY_FIXTURES = frozenset({"ray_head", "app"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE not in Path(item.path).parents:
            continue
        used = RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(f"{item.nodeid} is a fast test but uses {', '.join(sorted(used))} (Ray): "
                                    f"move it out of tests/fast")
        item.add_marker(pytest.mark.fast)
