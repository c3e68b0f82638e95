"""docs/algorithm.md statistics and loss: hand-computed values, gradient directions, invariances, equivalences."""

import pytest
import torch

from learner.trainer.nft_loss import (
    ema_decay,
    group_filter,
    nft_loss,
    old_policy_decay,
    optimality,
    saturated_groups,
)
from motionnft_core.noise import noised

# ----------------------------------------------------------------------------- optimality

# 26 groups of 2: group 0 = [0, 1], the rest 0.5. Global population std = sqrt(2 * 0.25 / 52) = 0.0980581,
# so group 0 has A = +-0.5 / (0.0980581 + 1e-4) = +-5.094 -> clipped to +-5 -> r in {0, 1}; others r = 0.5.
_ONE_SPREAD_GROUP = [[0.0, 1.0]] + [[0.5, 0.5]] * 25


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        # one group [0, 1]: mean 0.5, population std 0.5 -> A = +-0.5/0.5001 = +-0.99980 -> r = 0.5 -+ 0.099980
        # (a sample std, 0.7071, would give r = 0.5 -+ 0.07070)
        ([[0.0, 1.0]], [[0.400020, 0.599980]]),
        # all equal: std 0 -> A = 0 / 1e-4 = 0 -> r = 0.5
        ([[0.3, 0.3], [0.3, 0.3]], [[0.5, 0.5], [0.5, 0.5]]),
        # equal rewards in group 0 -> A = 0 there regardless of the global std; group 1 has [0, 1]:
        # all four = [.3, .3, 0, 1], mean .4, population var = (.01+.01+.16+.36)/4 = .135, std = .367423
        # group 1: A = +-0.5/0.367523 = +-1.36045 -> r = 0.5 -+ 0.136045
        ([[0.3, 0.3], [0.0, 1.0]], [[0.5, 0.5], [0.363955, 0.636045]]),
        # |A| >= 5 -> r in {0, 1}
        (_ONE_SPREAD_GROUP, [[0.0, 1.0]] + [[0.5, 0.5]] * 25),
    ],
)
def test_optimality_hand_computed(rewards, expected):
    r = optimality(torch.tensor(rewards))
    assert r.dtype == torch.float32
    assert torch.allclose(r, torch.tensor(expected), atol=1e-5), r


def test_optimality_clip_and_eps_are_parameters():
    # [0, 1]: A = +-0.5 / (0.5 + 0.5) = +-0.5 with eps = 0.5; clip = 1 -> r = clip(A, -1, 1)/2 + 0.5 = 0.25, 0.75
    r = optimality(torch.tensor([[0.0, 1.0]]), eps=0.5, clip=1.0)
    assert torch.allclose(r, torch.tensor([[0.25, 0.75]]), atol=1e-6)


@pytest.mark.parametrize(
    ("rewards", "match"),
    [([0.1, 0.2], r"\(P, K\)"), ([[0.1, float("nan")]], "finite"), ([[0.1, float("inf")]], "finite")],
)
def test_optimality_rejects_bad_rewards(rewards, match):
    with pytest.raises(ValueError, match=match):
        optimality(torch.tensor(rewards))


# ----------------------------------------------------------------------------- group filter / ban


@pytest.mark.parametrize(
    ("group", "valid", "saturated"),
    [
        ([0.0, 1.0], True, False),  # std .5, mean .5
        ([0.5, 0.52], False, False),  # std .01 (< .05), mean .51
        ([0.95, 0.97], False, True),  # std .01, mean .96: saturated -> ban the prompt
        ([0.88, 1.0], False, False),  # std .06, mean .94 (>= .9): neither
        ([0.0, 0.0], False, False),  # all failed: std 0, mean 0
        ([0.5, 0.58], False, False),  # population std .04 -> masked (a sample std .0566 would keep it)
        ([0.92] * 7 + [1.0], False, True),  # K=8: mean .93, std sqrt((7*.01^2 + .07^2)/8) = .02646
    ],
)
def test_group_filter_and_saturation(group, valid, saturated):
    rewards = torch.tensor([group])
    assert group_filter(rewards).tolist() == [valid]
    assert saturated_groups(rewards).tolist() == [saturated]


def test_group_filter_is_per_row():
    rewards = torch.tensor([[0.0, 1.0], [0.95, 0.97], [0.5, 0.52]])
    assert group_filter(rewards).tolist() == [True, False, False]
    assert saturated_groups(rewards).tolist() == [False, True, False]
    # thresholds are parameters: with min_std = 0.005 the third group (std .01) becomes valid
    assert group_filter(rewards, min_std=0.005).tolist() == [True, False, True]
    assert saturated_groups(rewards, min_mean=0.99).tolist() == [False, False, False]


# ----------------------------------------------------------------------------- forward process


# ----------------------------------------------------------------------------- loss: hand example


def _one_sample(beta: float = 1.0):
    """x0 = [1, 0], x_t = [.5, .5] at t = .5, v_old = 0, v_theta = [2, 0], v_ref = [0, 2], r = .75."""
    v_theta = torch.tensor([[2.0, 0.0]], requires_grad=True)
    inputs = dict(
        v_old=torch.zeros(1, 2),
        v_ref=torch.tensor([[0.0, 2.0]]),
        x_t=torch.tensor([[0.5, 0.5]]),
        x0=torch.tensor([[1.0, 0.0]]),
        t=torch.tensor([0.5]),
        r=torch.tensor([0.75]),
        valid=torch.tensor([True]),
    )
    return v_theta, inputs


def test_loss_hand_computed_one_sample():
    # beta = 1: v+ = v_theta = [2, 0];  v- = 2 v_old - v_theta = [-2, 0]
    # x+ = x_t - .5 v+ = [-.5, .5], x+ - x0 = [-1.5, .5]: mean sq = (2.25 + .25)/2 = 1.25, mean abs = 1 -> L+ = 1.25
    # x- = x_t - .5 v- = [1.5, .5], x- - x0 = [.5, .5]:    mean sq = .25, mean abs = .5            -> L- = .5
    # policy = 5 * (.75 * 1.25 + .25 * .5) = 5 * 1.0625 = 5.3125
    # kl = mean((v_theta - v_ref)^2) = mean([4, 4]) = 4  -> loss = 5.3125 + 1e-4 * 4 = 5.3129
    # gradient (weights are constants 1 and .5):
    #   dL+/dv = (x+ - x0) * (-t) / 1 = [.75, -.25];  dL-/dv = (x- - x0) * (+t) / .5 = [.5, .5]
    #   d policy = 5 * (.75 * [.75, -.25] + .25 * [.5, .5]) = [3.4375, -.3125]
    #   d kl term = 1e-4 * (v_theta - v_ref) = [2e-4, -2e-4]    -> grad = [3.4377, -.3127]
    v_theta, inputs = _one_sample()
    loss, metrics = nft_loss(v_theta, **inputs)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(5.3129, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(5.3125, abs=1e-6)
    assert metrics["kl_loss"].item() == pytest.approx(4.0, abs=1e-6)
    assert metrics["loss_pos"].item() == pytest.approx(1.25, abs=1e-6)
    assert metrics["loss_neg"].item() == pytest.approx(0.5, abs=1e-6)
    assert metrics["n_valid"].item() == 1
    assert not any(m.requires_grad for m in metrics.values())
    loss.backward()
    assert torch.allclose(v_theta.grad, torch.tensor([[3.4377, -0.3127]]), atol=1e-6), v_theta.grad


def test_loss_weights_are_floored():
    # x+ = x0 exactly: mean|x+ - x0| = 0 -> weight = max(0, 1e-5) = 1e-5; L+ = 0 / 1e-5 = 0 (no division by 0)
    x0 = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[-1.0, 1.0]], requires_grad=True)  # x_t - .5 * v = [1, 0] with x_t = [.5, .5]
    loss, m = nft_loss(v, v.detach(), v.detach(), torch.tensor([[0.5, 0.5]]), x0, torch.tensor([0.5]),
                       torch.tensor([1.0]), torch.tensor([True]))  # fmt: skip
    assert m["loss_pos"].item() == 0.0 and m["loss_neg"].item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


# ----------------------------------------------------------------------------- loss: behaviour


def _random_batch(b: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, 4, 4)

    def rnd() -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    x0, eps = rnd(), rnd()
    t = torch.rand(b, generator=g, dtype=torch.float64).to(dtype) * 0.8 + 0.1
    return dict(
        v_old=rnd(),
        v_ref=rnd(),
        x_t=noised(x0, eps, t),
        x0=x0,
        t=t,
        r=torch.rand(b, generator=g, dtype=torch.float64).to(dtype),
        valid=torch.ones(b, dtype=torch.bool),
    )


def _x_pos_error(v_theta: torch.Tensor, batch: dict) -> float:
    t = batch["t"].view(-1, 1, 1, 1)
    return (batch["x_t"] - t * v_theta - batch["x0"]).norm().item()


@pytest.mark.parametrize(("r", "closer"), [(1.0, True), (0.0, False)])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_gradient_step_direction(r, closer, beta):
    """From v_theta = v_old: r = 1 pulls x+ toward x0, r = 0 pushes it away (implicit negative policy)."""
    batch = _random_batch()
    batch["r"] = torch.full((4,), r)
    v_theta = batch["v_old"].clone().requires_grad_(True)
    loss, _ = nft_loss(v_theta, **batch, beta=beta, kl_weight=0.0)
    loss.backward()
    before = _x_pos_error(v_theta.detach(), batch)
    after = _x_pos_error(v_theta.detach() - 1e-2 * v_theta.grad, batch)
    assert (after < before) == closer, (before, after)
    assert abs(after - before) > 1e-4 * before


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("r", [0.0, 0.5, 0.8, 1.0])
def test_beta_limits_at_old_policy(beta, r):
    """At v_theta = v_old, v+ = v- = v_old for every beta, so L+ = L- = L(v_old):

    policy loss = 5 * L(v_old) / beta, and its gradient is (2r - 1) * 5 * dL/dv(v_old) for every beta
    (dv+/dv_theta = beta, dv-/dv_theta = -beta, divided by beta): r = 0.5 gives no policy gradient.
    """
    batch = _random_batch()
    batch["r"] = torch.full((4,), r)
    v_theta = batch["v_old"].clone().requires_grad_(True)
    loss, m = nft_loss(v_theta, **batch, beta=beta, kl_weight=0.0)
    loss.backward()

    v_probe = batch["v_old"].clone().requires_grad_(True)  # L(v) = mean_b mean((x_t - t v - x0)^2 / w)
    ref_loss, ref_m = nft_loss(v_probe, **{**batch, "r": torch.ones(4)}, beta=1.0, kl_weight=0.0)
    ref_loss.backward()  # = 5 * L(v_old) and its gradient
    assert m["loss_pos"].item() == pytest.approx(m["loss_neg"].item(), rel=1e-6)
    assert loss.item() == pytest.approx(ref_loss.item() / beta, rel=1e-6)
    assert torch.allclose(v_theta.grad, (2 * r - 1) * v_probe.grad, atol=1e-6, rtol=1e-5)


def test_beta_one_positive_branch_is_v_theta():
    """beta = 1: v+ = v_theta (v_old drops out of L+), v- = 2 v_old - v_theta."""
    batch = _random_batch()
    v_theta = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    _, m1 = nft_loss(v_theta, **batch)
    _, m2 = nft_loss(v_theta, **{**batch, "v_old": batch["v_old"] + 3.0})
    assert m1["loss_pos"].item() == pytest.approx(m2["loss_pos"].item(), rel=1e-6)
    assert m1["loss_neg"].item() != pytest.approx(m2["loss_neg"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(v_theta, **batch, beta=0.0)


def test_masked_samples_do_not_move_the_loss():
    """Invariance: changing excluded samples changes neither the loss nor any gradient of valid samples."""
    batch = _random_batch(b=4)
    batch["valid"] = torch.tensor([True, False, True, False])
    v_theta = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss, m = nft_loss(v_theta, **batch)
    loss.backward()

    changed = {k: v.clone() for k, v in batch.items()}
    for key in ("v_old", "v_ref", "x_t", "x0"):
        changed[key][1] = 1e3
        changed[key][3] = float("nan")  # a broken excluded sample must not leak either
    changed["r"][1], changed["t"][3] = 0.0, 0.9
    v2 = v_theta.detach().clone()
    v2[1] = -7.0
    v2.requires_grad_(True)
    loss2, m2 = nft_loss(v2, **changed)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert m2["n_valid"].item() == 2
    assert torch.equal(v2.grad[[0, 2]], v_theta.grad[[0, 2]])
    assert torch.equal(v_theta.grad[[1, 3]], torch.zeros_like(v_theta.grad[[1, 3]]))

    # and it equals the loss of the valid samples alone
    only = {k: v[[0, 2]] for k, v in batch.items()}
    loss3, _ = nft_loss(v_theta.detach()[[0, 2]], **only)
    assert loss3.item() == pytest.approx(loss.item(), rel=1e-12)


def test_no_valid_sample_gives_zero_loss_with_graph():
    batch = _random_batch()
    batch["valid"] = torch.zeros(4, dtype=torch.bool)
    v_theta = torch.randn(4, 3, 4, 4, requires_grad=True)
    loss, m = nft_loss(v_theta, **batch)
    assert loss.item() == 0.0 and loss.requires_grad
    assert m["n_valid"].item() == 0 and m["loss_pos"].item() == 0.0
    loss.backward()
    assert torch.equal(v_theta.grad, torch.zeros_like(v_theta))


def test_batch_equals_mean_of_single_samples():
    """Vectorized over B == average of per-sample losses (all valid), within float64 rounding."""
    batch = _random_batch(b=4)
    v_theta = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    loss, _ = nft_loss(v_theta, **batch)
    singles = [nft_loss(v_theta[i : i + 1], **{k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(4)]
    diff = abs(loss.item() - sum(s.item() for s in singles) / 4)
    assert diff < 1e-10 * abs(loss.item()), diff


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_matches_float64_reference(seed):
    b64 = _random_batch(dtype=torch.float64, seed=seed)
    b32 = {k: (v.float() if v.is_floating_point() else v) for k, v in b64.items()}
    v64 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    v64.requires_grad_(True)
    v32 = v64.detach().float().requires_grad_(True)
    loss64, m64 = nft_loss(v64, **b64)
    loss32, m32 = nft_loss(v32, **b32)
    loss64.backward()
    loss32.backward()
    rel = abs(loss32.item() - loss64.item()) / abs(loss64.item())
    assert rel < 1e-6, rel
    grad_diff = (v32.grad.double() - v64.grad).abs().max().item()
    assert grad_diff < 1e-5 * v64.grad.abs().max().item(), grad_diff
    for key in ("policy_loss", "kl_loss", "loss_pos", "loss_neg"):
        assert m32[key].item() == pytest.approx(m64[key].item(), rel=1e-5), key


def test_loss_rejects_bad_shapes():
    batch = _random_batch()
    v = torch.zeros(4, 3, 4, 4)
    with pytest.raises(ValueError, match="v_old shape"):
        nft_loss(v, **{**batch, "v_old": torch.zeros(4, 3, 4)})
    with pytest.raises(ValueError, match="r must have shape"):
        nft_loss(v, **{**batch, "r": torch.zeros(3)})
    with pytest.raises(ValueError, match="valid must be a bool"):
        nft_loss(v, **{**batch, "valid": torch.ones(4)})


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("linear_capped", 0, 0.0),
        ("linear_capped", 1, 0.001),
        ("linear_capped", 250, 0.25),
        ("linear_capped", 500, 0.5),
        ("linear_capped", 10_000, 0.5),
        ("none", 0, 0.0),
        ("none", 1000, 0.0),
        ("delayed", 0, 0.0),
        ("delayed", 74, 0.0),
        ("delayed", 75, 0.0),
        ("delayed", 76, 0.0075),
        ("delayed", 175, 0.75),
        ("delayed", 208, 0.9975),
        ("delayed", 209, 0.999),  # 0.0075 * 134 = 1.005 -> capped
        ("delayed", 10_000, 0.999),
    ],
)
def test_old_policy_decay(schedule, step, expected):
    assert old_policy_decay(step, schedule=schedule) == pytest.approx(expected, abs=1e-12)


def test_old_policy_decay_constants_and_errors():
    assert old_policy_decay(10, linear_rate=0.01, linear_cap=0.05) == pytest.approx(0.05)
    assert old_policy_decay(12, schedule="delayed", delay_steps=10, delayed_rate=0.1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'cosine'"):
        old_policy_decay(1, schedule="cosine")
    with pytest.raises(ValueError, match="step must be >= 0"):
        old_policy_decay(-1)


@pytest.mark.parametrize(("k", "expected"), [(0, 0.1), (1, 2 / 11), (10, 0.55), (80, 0.9), (81, 0.9), (1000, 0.9)])
def test_ema_decay(k, expected):
    assert ema_decay(k) == pytest.approx(expected, abs=1e-12)


def test_ema_decay_cap():
    assert ema_decay(500, cap=0.99) == pytest.approx(501 / 510)  # 0.98235 < cap
    assert ema_decay(10_000, cap=0.99) == 0.99


# ----------------------------------------------------------------------------- training timesteps


def test_group_stats_inverts_only_the_direction():
    from learner.driver.loop import group_stats
    from motionnft_core.config_loader import load_config

    base = ["model.tiny=true", "data.synthetic=8", "reward.judge_weight=0", "nft.group_min_std=0.05"]
    rewards = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 0.7, 0.7, 0.7], [0.95, 0.95, 0.96, 0.95]], dtype=torch.float64)
    r, valid, banned = group_stats(rewards, load_config(None, base))
    r_inv, valid_inv, banned_inv = group_stats(rewards, load_config(None, base + ["nft.invert_reward=true"]))
    assert torch.allclose(r_inv, 1 - r)
    assert r[0].argmax() == 2 and r_inv[0].argmax() == 0  # the best candidate becomes the most negative
    assert valid.tolist() == valid_inv.tolist() == [True, False, False]
    assert banned.tolist() == banned_inv.tolist() == [False, False, True]
