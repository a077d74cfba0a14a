import itertools
import random

import pytest

from surgery.errors import SurgeryError
from surgery.planner import lagrangian_bound, solve


def brute_force(errors, costs, capacity):
    best = None
    for choice in itertools.product(*(range(len(e)) for e in errors)):
        cost = sum(c[r] for c, r in zip(costs, choice))
        if cost <= capacity + 1e-12:
            err = sum(e[r] for e, r in zip(errors, choice))
            best = err if best is None else min(best, err)
    return best


def random_instance(rng, integer):
    layers = rng.randint(1, 5)
    errors, costs = [], []
    for _ in range(layers):
        k = rng.randint(1, 4)
        errors.append([rng.random() for _ in range(k)])
        costs.append([rng.randint(1, 20) if integer else rng.uniform(0.5, 20) for _ in range(k)])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    capacity = rng.randint(lo, hi) if integer else rng.uniform(lo + 1, hi + 1)
    return errors, costs, capacity


@pytest.mark.parametrize("seed", range(200))
def test_exact_on_integer_costs(seed):
    rng = random.Random(seed)
    errors, costs, capacity = random_instance(rng, integer=True)
    solution = solve(errors, costs, capacity, unit=1)
    assert solution.cost <= capacity
    assert solution.objective == pytest.approx(brute_force(errors, costs, capacity), abs=1e-12)
    assert solution.lower_bound <= solution.objective + 1e-12


@pytest.mark.parametrize("seed", range(200))
def test_float_costs_feasible_and_within_the_reported_gap(seed):
    rng = random.Random(1000 + seed)
    errors, costs, capacity = random_instance(rng, integer=False)
    solution = solve(errors, costs, capacity, unit=0.01)
    optimum = brute_force(errors, costs, capacity)
    assert solution.cost <= capacity + 1e-9
    assert optimum - 1e-12 <= solution.objective <= optimum + solution.gap + 1e-12
    assert lagrangian_bound(errors, costs, capacity) <= optimum + 1e-12


def test_more_capacity_never_hurts():
    rng = random.Random(7)
    errors = [[rng.random() for _ in range(5)] for _ in range(12)]
    costs = [[rng.uniform(1, 10) for _ in range(5)] for _ in range(12)]
    objectives = [solve(errors, costs, cap, unit=0.05).objective for cap in range(40, 121, 5)]
    assert all(a >= b for a, b in zip(objectives, objectives[1:]))


def test_capacity_below_cheapest_is_an_error():
    with pytest.raises(SurgeryError, match="below the cheapest"):
        solve([[0.0, 1.0]], [[5.0, 3.0]], 2.0, unit=1)
