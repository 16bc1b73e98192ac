"""Shared pytest setup: the tests use tiny models, for which a second CPU thread only adds synchronisation
(up to 20-70x slower on a busy 2-core machine)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
