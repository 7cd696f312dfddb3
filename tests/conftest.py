"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and samplers gain nothing from intra-op threads: on a busy 2-core machine a second OpenMP
    thread only adds a barrier wait to each of thousands of small ops (measured 4-10x slower). Used per module
    (`pytestmark = pytest.mark.usefixtures("one_thread")`); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
