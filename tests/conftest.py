"""Shared pytest setup. `pytest --device cuda` runs the device-dependent tests (training steps, resume, sampling) on
that device; the default is the CPU. The tests use tiny models, for which a second CPU thread only adds
synchronisation (up to 20-70x slower on a busy 2-core machine)."""

import os

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
