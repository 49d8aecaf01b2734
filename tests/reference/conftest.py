"""Reference tests run tiny float64 ops: one intra-op thread avoids OpenMP oversubscription on a
shared CPU (with two threads on two busy cores gradcheck runs ~20x slower)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
