"""Shared pytest setup. `pytest --device cuda` runs the device-dependent tests (training steps, resume, sampling) on
that device; the default is the CPU. The tests use tiny models, for which a second CPU thread only adds
synchronisation (up to 20-70x slower on a busy 2-core machine)."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the device-dependent tests: cpu (default) or cuda")


def pytest_configure(config):
    os.environ["REG_TEST_DEVICE"] = config.getoption("--device")  # read by the test modules as DEVICE


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def lock_held_elsewhere(folder):
    """Another process holding the run folder's lock (reg.lock_folder) for the duration; killed (as kill -9) after."""
    code = f"import reg, time; held = reg.lock_folder({str(folder)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
