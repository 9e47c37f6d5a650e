"""Run order for the whole suite: the longest modules first.

``make test`` runs the suite on two pytest-xdist workers, one module at a time
per worker (``--dist loadfile``), taking modules in collection order. The few
modules that take minutes (they start real coordinators, nodes and Flower
processes and wait on them) go first, so neither worker is left with one of
them at the end while the other idles. Order within a module is unchanged.
"""

from __future__ import annotations

import pytest

#: Measured on two cores, longest first (see the README's "Tests" section).
LONGEST_FIRST = (
    "tests/integration/test_training.py",
    "tests/integration/test_demo.py",
    "tests/integration/test_federation_e2e.py",
    "tests/integration/test_node_outbox.py",
    "tests/integration/test_api_fuzz.py",
    "tests/integration/test_docs.py",
    "tests/integration/test_coordinator_web_ui.py",
    "tests/integration/test_fuzz_intake.py",
    "tests/integration/test_coordinator_intake.py",
    "tests/integration/test_coordinator_federation.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
