"""Fixtures and helpers shared by the kernel tests."""

import contextlib

import pytest
import torch


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """`torch.use_deterministic_algorithms(enabled)` inside, the previous setting restored after. warn_only:
    torch's own ops with no deterministic version warn rather than fail."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every float tensor the kernels allocate starts as NaN, so an unwritten element shows."""
    empty_like, empty = torch.empty_like, torch.empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
