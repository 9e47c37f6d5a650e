"""Run order for the whole suite on pytest-xdist workers: the longest modules first.

``make test`` runs the suite on two workers, one module at a time per worker
(``--dist loadfile``). xdist hands out modules by their number of tests, most
first, which would leave the few modules that take minutes with few tests (they
start real coordinators, nodes and Flower processes and wait on them) for the
end, with one worker idle while the other finishes them. This scheduler hands
those out first. Order within a module is unchanged; a plain ``pytest`` run
(no workers) is not affected.
"""

from __future__ import annotations

from typing import Any

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
    "tests/integration/test_security.py",
    "tests/integration/test_security_auth.py",
    "tests/integration/test_load_smoke.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):  # type: ignore[misc]
        def _assign_work_unit(self, node: Any) -> None:
            for scope in reversed(LONGEST_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return LongestFirst(config, log)
