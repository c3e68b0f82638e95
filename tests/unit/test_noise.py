"""The rollout-learner seed and noise contract (motionnft_core/noise.py): forward process, training draws, seeds."""

import pytest
import torch

from motionnft_core.noise import candidate_seed, derive_seed, noised, training_draws, training_seed, training_timesteps


def test_seeds_are_pinned_distinct_and_stable():
    """Seeds are part of every saved run's meaning (a resume redraws them): their values are pinned."""
    assert candidate_seed(0, 3, "synth-0-000001", 2) == 4879052978501707633
    assert training_seed(0, 3, "p", 1) == 4454942602970477946
    assert training_seed(0, 3, "p", 1) == derive_seed("train", 0, 3, "p", 1) != candidate_seed(0, 3, "p", 1)
    seeds = {candidate_seed(0, step, p, k) for step in range(3) for p in ("a", "b") for k in range(4)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)


def test_noised_hand_computed():
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    eps = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    t = torch.tensor([0.25, 0.5])
    # row 0: 0.75 * [1, 2] = [.75, 1.5]; row 1: 0.5 * [3, 4] + 0.5 * [1, -1] = [2, 1.5]
    assert torch.allclose(noised(x0, eps, t), torch.tensor([[0.75, 1.5], [2.0, 1.5]]))
    with pytest.raises(ValueError, match="t must have shape"):
        noised(x0, eps, torch.tensor([0.5]))


def test_training_timesteps_pick_a_random_subset_per_sample():
    sigmas = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.4, 0.2], dtype=torch.float64)
    ts = training_timesteps(sigmas, fraction=0.99, generator=torch.Generator().manual_seed(0), num_samples=600)
    assert ts.shape == (600, 5)  # int(6 * 0.99) = 5
    assert ts.dtype == torch.float64
    grid = set(sigmas.tolist())
    left_out = []
    for row in ts.tolist():
        assert len(set(row)) == 5 and set(row) <= grid  # 5 distinct grid points
        left_out.append((grid - set(row)).pop())
    # any of the six may be left out (sigma = 1 included), about uniformly (expected 100 each)
    counts = [left_out.count(s) for s in sigmas.tolist()]
    assert min(counts) > 60, counts
    # random order, not sorted: a decreasing row has probability 1/120
    n_sorted = sum(row == sorted(row, reverse=True) for row in ts.tolist())
    assert n_sorted < 30, n_sorted


def test_training_timesteps_reproducible_and_validated():
    sigmas = torch.linspace(1.0, 1 / 6, 6)
    a = training_timesteps(sigmas, fraction=0.99, generator=torch.Generator().manual_seed(5), num_samples=3)
    b = training_timesteps(sigmas, fraction=0.99, generator=torch.Generator().manual_seed(5), num_samples=3)
    assert torch.equal(a, b)
    full = training_timesteps(sigmas, fraction=1.0, generator=torch.Generator().manual_seed(5))
    assert full.shape == (1, 6) and sorted(full[0].tolist()) == sorted(sigmas.tolist())
    assert training_timesteps(sigmas, fraction=0.5, generator=torch.Generator()).shape == (1, 3)
    with pytest.raises(ValueError, match="fraction"):
        training_timesteps(sigmas, fraction=0.1, generator=torch.Generator())  # int(0.6) = 0
    with pytest.raises(ValueError, match="1-D"):
        training_timesteps(sigmas[None], fraction=0.99, generator=torch.Generator())


def test_training_draws_order_is_times_then_noise_per_timestep():
    """The draw order is part of the contract between learner and rollout: pin it."""
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.1])
    seed = training_seed(0, 3, "p", 1)
    times, eps = training_draws(sigmas, (2, 3), fraction=0.99, seed=seed)
    g = torch.Generator().manual_seed(seed)
    expected_t = training_timesteps(sigmas, fraction=0.99, generator=g)[0]
    expected_eps = torch.stack([torch.randn(2, 3, generator=g) for _ in range(5)])
    assert torch.equal(times, expected_t) and torch.equal(eps, expected_eps)
    assert times.shape == (5,) and len(set(times.tolist())) == 5
    assert training_seed(0, 3, "p", 1) != training_seed(0, 3, "p", 2) != training_seed(0, 4, "p", 1)
