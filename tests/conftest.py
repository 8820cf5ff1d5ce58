"""Shared test set-up: one compute thread per process, the helper modules on the path, and two kinds of long test.

* Threads: on a shared 2-core machine, OpenMP threads of two processes thrash (a test file went from 96 s to over
  25 minutes). Every test process, and every subprocess a test starts, uses LIERA_TEST_THREADS threads (default 1).
* ``smoke``: the long end-to-end files (demo, experiments, distributed runs, the Trainer). They run in their own step
  (``python -m pytest -q -m smoke``); a plain ``python -m pytest -q`` leaves them out. CI runs both.
* ``slow``: long experiments, skipped unless --runslow.
"""
import os
import sys
from pathlib import Path

THREADS = os.environ.setdefault("LIERA_TEST_THREADS", "1")
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, THREADS)  # before torch is imported: OpenMP reads it once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))
sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow experiments")


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: long end-to-end tests, run with -m smoke (CI's second step)")


def pytest_collection_modifyitems(config, items):
    if not config.option.markexpr:  # no -m given: the fast suite, without the long smoke files
        keep = [item for item in items if "smoke" not in item.keywords]
        if len(keep) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if "smoke" in item.keywords])
            items[:] = keep
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
