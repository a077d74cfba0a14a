"""Fixtures shared by the kernel tests."""

import pytest
import torch


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every float tensor the kernels allocate starts as NaN, so an unwritten element shows."""
    empty_like, empty = torch.empty_like, torch.empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
