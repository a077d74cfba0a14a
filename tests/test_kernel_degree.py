"""scripts/attention_kernel_degree.py: its polynomial fit against the closed form for Gaussian logits."""

import math

import torch

from .conftest import load_script


def _script():
    return load_script("scripts/attention_kernel_degree.py")


def test_shares_match_the_hermite_expansion_of_exp():
    # x ~ N(0, 1): e^x = e^{1/2} Σ He_i(x)/i!, so degree n explains Σ_{1≤i≤n} 1/i! / (e − 1) of Var(e^x).
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = [sum(1 / math.factorial(i) for i in range(1, n + 1)) / (math.e - 1) for n in (1, 2, 3, 4)]
    for share, closed_form in zip(_script().explained_shares(x), expected):
        assert abs(share - closed_form) < 0.01


def test_runs_on_the_tiny_model(capsys):
    means = _script().main(["--model", "tiny", "--samples", "1"])
    assert sorted(means) == [0, 1, 2, 3]
    std, *shares = means[0]
    assert 0.5 < std < 2 and shares == sorted(shares) and shares[-1] <= 1
    assert "| layer |" in capsys.readouterr().out
