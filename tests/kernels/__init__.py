"""Kernel tests: Triton vs the PyTorch references (interpret mode on CPU is set by tests/conftest.py)."""
