"""Fixtures more than one test module uses."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_views(n: int, size: int = 16, seed: int = 0) -> dict:
    """A siamese batch: random images and a noisy copy as the two views, ``{"views": [(n, 3, size, size)] * 2}``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return {"views": [x, x + 0.3 * torch.randn(n, 3, size, size, generator=g)]}


def flat(module: torch.nn.Module) -> torch.Tensor:
    """A detached copy of every parameter of ``module``, flattened into one vector (to compare before and after a step)."""
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()
