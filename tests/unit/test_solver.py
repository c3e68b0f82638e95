"""FlowDPMSolver: hand-computed steps, exactness on a perfect model, diffusers as an oracle, state reset."""

import pytest
import torch

from actors.solver import FlowDPMSolver


def shifted_grid(n: int, shift: float = 3.0) -> torch.Tensor:
    """docs/architecture.md grid: linspace(1, 1/n, n) with a static shift s' = shift*s / (1 + (shift-1)*s)."""
    s = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def dummy_model(x: torch.Tensor, s: float) -> torch.Tensor:
    """Closed-form, nonlinear stand-in for a network (diffusers' test style)."""
    return torch.tanh(x) * s + 0.3 * x * (1.0 - s) - 0.1


def dummy_sample() -> torch.Tensor:
    return torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 48.0 - 0.5


def run(solver: FlowDPMSolver, sigmas: torch.Tensor, x: torch.Tensor, model=dummy_model) -> torch.Tensor:
    solver.set_timesteps(sigmas)
    for s in solver.timesteps.tolist():
        x = solver.step(model(x, s), x)
    return x


# Hand computations (flow matching: alpha = 1 - s, sigma = s, lambda = log((1-s)/s); x0_pred m = x - s*v).
#  a) sigmas [1.0, 0.5] -> 0, x = 1, v = (0.5, 1):
#     step 0 (first order, 1 -> 0.5): m0 = 1 - 1*0.5 = 0.5; x1 = (0.5/1)*1 + (0.5 - 0.5*0/1)*0.5 = 0.75
#     step 1 (last, 0.5 -> 0): returns m1 = 0.75 - 0.5*1 = 0.25
#  b) sigmas [0.8, 0.5, 0.2] -> 0, x = 1, v = (0.5, 1, 2); lambdas: -log 4, 0, log 4
#     step 0 (first order, 0.8 -> 0.5): m0 = 1 - 0.4 = 0.6; x1 = 0.625*1 + (0.5 - 0.5*0.2/0.8)*0.6 = 0.85
#     step 1 (second order, 0.5 -> 0.2): h = log 4, h0 = log 4, r0 = 1, exp(-h) = 1/4, alpha_t = 0.8
#            m1 = 0.85 - 0.5 = 0.35; D0 = 0.35, D1 = 0.35 - 0.6 = -0.25
#            x2 = (0.2/0.5)*0.85 + 0.8*(1 - 1/4)*(D0 + D1/2) = 0.34 + 0.6*0.225 = 0.475
#     step 2 (last, 0.2 -> 0): returns 0.475 - 0.2*2 = 0.075
#  c) sigmas [1.0, 0.5, 0.2] -> 0, x = 1, v = (0.5, 1, 2): previous point of step 1 is sigma = 1
#     (lambda = -inf), so r0 = inf, D1 = 0 and step 1 is first order.
#     step 0: m0 = 0.5, x1 = 0.75; step 1: m1 = 0.75 - 0.5 = 0.25, x2 = 0.4*0.75 + 0.6*0.25 = 0.45
#     step 2: returns 0.45 - 0.4 = 0.05
#  d) final_sigma = 0.25, sigmas [0.5] -> 0.25, x = 1, v = 1: m0 = 0.5;
#     x1 = (0.25/0.5)*1 + (0.75 - 0.25*0.5/0.5)*0.5 = 0.5 + 0.25 = 0.75
@pytest.mark.parametrize(
    ("sigmas", "velocities", "final_sigma", "expected"),
    [
        ([1.0, 0.5], [0.5, 1.0], 0.0, [0.75, 0.25]),
        ([0.8, 0.5, 0.2], [0.5, 1.0, 2.0], 0.0, [0.85, 0.475, 0.075]),
        ([1.0, 0.5, 0.2], [0.5, 1.0, 2.0], 0.0, [0.75, 0.45, 0.05]),
        ([0.5], [1.0], 0.25, [0.75]),
    ],
)
def test_hand_computed_steps(sigmas, velocities, final_sigma, expected):
    solver = FlowDPMSolver(final_sigma=final_sigma)
    solver.set_timesteps(torch.tensor(sigmas))
    x = torch.ones(3)
    for v, want in zip(velocities, expected, strict=True):
        x = solver.step(torch.full((3,), v), x)
        assert torch.allclose(x, torch.full((3,), want), atol=1e-6), (x, want)
    assert solver.step_index == len(sigmas)


def test_golden_full_loop():
    """6 shifted steps on the closed-form model; golden numbers also match diffusers (test below)."""
    x = run(FlowDPMSolver(), shifted_grid(6), dummy_sample())
    assert x.dtype == torch.float32
    assert abs(x.mean().item() - 0.3452162) < 1e-6, x.mean().item()
    assert abs(x.abs().mean().item() - 0.3753711) < 1e-6, x.abs().mean().item()


@pytest.mark.parametrize("sigmas", [shifted_grid(6), shifted_grid(6, shift=1.0), torch.tensor([0.9, 0.6, 0.3])])
def test_perfect_velocity_recovers_x0(sigmas):
    """With v = eps - x0 exactly, every x0_pred is x0, each step lands on the path and the last returns x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    solver = FlowDPMSolver()
    solver.set_timesteps(sigmas)
    grid = solver.sigmas.tolist()
    x = (1 - grid[0]) * x0 + grid[0] * eps
    for i in range(solver.num_steps):
        x = solver.step(eps - x0, x)
        on_path = (1 - grid[i + 1]) * x0 + grid[i + 1] * eps
        assert torch.allclose(x, on_path, atol=1e-12), (x - on_path).abs().max()
    assert torch.allclose(x, x0, atol=1e-12)


def _diffusers_scheduler(num_steps: int):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def _compare_with_diffusers(scheduler, solver: FlowDPMSolver) -> None:
    xa = xb = dummy_sample()
    for i, t in enumerate(scheduler.timesteps):
        s = solver.timesteps[i].item()
        xa = scheduler.step(dummy_model(xa, s), t, xa).prev_sample
        xb = solver.step(dummy_model(xb, s), xb)
        diff = (xa - xb).abs().max().item()
        assert diff < 2e-6, f"step {i}: max diff {diff}"


@pytest.mark.parametrize("num_steps", [1, 2, 6, 10])
def test_matches_diffusers_on_its_own_grid(num_steps):
    """Oracle: diffusers' DPMSolverMultistepScheduler (flow sigmas), fed its own grid.

    diffusers 0.42 builds the flow grid itself (set_timesteps takes no sigmas with use_flow_sigmas): it starts
    at 1 - 1/num_train_timesteps, not 1. Our solver takes that grid unchanged.
    """
    scheduler = _diffusers_scheduler(num_steps)
    solver = FlowDPMSolver()
    solver.set_timesteps(scheduler.sigmas[:-1])
    assert torch.equal(solver.sigmas.float(), scheduler.sigmas)
    _compare_with_diffusers(scheduler, solver)


def test_matches_diffusers_on_design_grid():
    """Oracle on the DESIGN grid, which starts at sigma = 1 (lambda = -inf).

    diffusers cannot build this grid through set_timesteps, so its ``sigmas`` attribute is replaced after
    set_timesteps(6) (same length, so its step counting and lower_order_final are unchanged). diffusers
    passes sigma = 1 through IEEE infinities; we handle it explicitly; the results must agree.
    """
    scheduler = _diffusers_scheduler(6)
    grid = shifted_grid(6)
    scheduler.sigmas = torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).float()
    scheduler.set_begin_index(0)
    solver = FlowDPMSolver()
    solver.set_timesteps(grid)
    _compare_with_diffusers(scheduler, solver)


def test_set_timesteps_resets_state():
    sample = dummy_sample()
    fresh = run(FlowDPMSolver(), shifted_grid(6), sample)

    solver = FlowDPMSolver()
    solver.set_timesteps(torch.tensor([0.9, 0.7, 0.4]))
    x = sample
    for s in [0.9, 0.7]:  # leave a half-finished run with a stored model output behind
        x = solver.step(dummy_model(x, s) + 1.0, x)
    again = run(solver, shifted_grid(6), sample)
    assert torch.equal(again, fresh)
    assert solver.step_index == 6


def test_step_errors():
    solver = FlowDPMSolver()
    x = torch.zeros(2)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        solver.step(x, x)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        _ = solver.sigmas
    solver.set_timesteps(torch.tensor([0.5]))
    solver.step(x, x)
    with pytest.raises(RuntimeError, match="only 1 steps"):
        solver.step(x, x)
    solver.set_timesteps(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="velocity shape"):
        solver.step(torch.zeros(3), x)


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        (torch.tensor([]), "non-empty"),
        (torch.tensor([[0.5, 0.2]]), "1-D"),
        (torch.tensor([1.5, 0.5]), r"\(final_sigma=0.0, 1\]"),
        (torch.tensor([0.5, 0.0]), r"\(final_sigma=0.0, 1\]"),
        (torch.tensor([0.5, 0.5]), "strictly decreasing"),
        (torch.tensor([0.2, 0.5]), "strictly decreasing"),
        (torch.tensor([0.5, float("nan")]), "finite"),
    ],
)
def test_set_timesteps_rejects_bad_grids(sigmas, match):
    with pytest.raises(ValueError, match=match):
        FlowDPMSolver().set_timesteps(sigmas)


def test_final_sigma_validation_and_grid():
    with pytest.raises(ValueError, match="final_sigma"):
        FlowDPMSolver(final_sigma=1.0)
    solver = FlowDPMSolver(final_sigma=0.1)
    with pytest.raises(ValueError, match=r"\(final_sigma=0.1, 1\]"):
        solver.set_timesteps(torch.tensor([0.5, 0.1], dtype=torch.float64))
    solver.set_timesteps(torch.tensor([0.5, 0.2]))
    assert solver.sigmas.tolist() == pytest.approx([0.5, 0.2, 0.1])
    assert solver.timesteps.tolist() == pytest.approx([0.5, 0.2])
    assert solver.sigmas.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_round_trip(dtype):
    """Works in float32 (float64 stays float64) and returns the sample's dtype."""
    sample = dummy_sample()
    ref = run(FlowDPMSolver(), shifted_grid(6), sample.double())
    model = dummy_model if dtype == torch.float64 else (lambda x, s: dummy_model(x.float(), s))
    out = run(FlowDPMSolver(), shifted_grid(6), sample.to(dtype), model=model)
    assert out.dtype == dtype
    tol = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float64: 1e-12}[dtype]
    assert (out.double() - ref).abs().max().item() < tol
