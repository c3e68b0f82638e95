"""DPM-Solver++(2M) for flow-matching models (docs/architecture.md, phase 2: deterministic 6-step rollouts).

Flow matching writes a noisy sample as ``x_s = (1 - s) * x0 + s * eps`` and the model predicts the velocity
``v = eps - x0``, so the data prediction is ``x0_pred = x_s - s * v``. DPM-Solver++ (Lu et al. 2022,
https://huggingface.co/papers/2211.01095) integrates the data-prediction ODE in
``lambda = log(alpha / sigma)`` with ``alpha_s = 1 - s`` and ``sigma_s = s``. This is the same update as
diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
prediction_type="flow_prediction")`` and as the reference code's ``dpm2`` sampler (NVlabs/DiffusionNFT and
elainew728/motion-edit, ``flow_grpo/diffusers_patch/solver.py``), but takes the sigma grid directly.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowDPMSolverConfig:
    """Everything that defines the solver; the solver *is* this config plus per-run state."""

    final_sigma: float = 0.0  # sigma the last step lands on; 0 = the clean sample x0


class FlowDPMSolver:
    """DPM-Solver++(2M), data (x0) prediction, on a flow-matching sigma grid.

    Usage: ``set_timesteps(sigmas)`` once per sampling run, then ``step(velocity, sample)`` once per grid
    point, where ``velocity = model(sample, solver.timesteps[i])``.

    Which steps are first order:
      * the first step (there is no previous model output yet);
      * the last step, always (the reference ``dpm_step`` does so; diffusers does the same with
        ``final_sigmas_type="zero"`` or fewer than 15 steps). With ``final_sigma = 0``, ``lambda`` is
        ``+inf`` there: the step is handled explicitly and returns ``x0_pred`` exactly;
      * a step whose previous grid point is ``sigma = 1``: there ``alpha = 0`` and ``lambda = -inf``, so
        ``r0 = h_0 / h = inf`` and the correction ``D1 = (m0 - m1) / r0`` is exactly 0 (diffusers reaches the
        same value through IEEE infinities; here it is set explicitly).
    Every other step is the second-order multistep update.

    The first-order update is written as ``(sigma_t / sigma_s) * x + (alpha_t - sigma_t * alpha_s / sigma_s) *
    x0_pred``, which equals DPM-Solver++'s ``(sigma_t / sigma_s) * x - alpha_t * (exp(-h) - 1) * x0_pred`` but
    stays finite at ``sigma_s = 1`` and ``sigma_t = 0`` (it is DDIM with eta = 0, as the reference uses).

    Step coefficients are computed in float64 from the grid (kept on the CPU, so no host-device sync);
    tensors are updated in float32 (float64 inputs stay float64) and cast back to the sample's dtype.
    """

    def __init__(self, final_sigma: float = 0.0) -> None:
        if not (0.0 <= final_sigma < 1.0) or not math.isfinite(final_sigma):
            raise ValueError(f"final_sigma must be in [0, 1), got {final_sigma!r}")
        self.config = FlowDPMSolverConfig(final_sigma=float(final_sigma))
        self._sigmas: torch.Tensor | None = None
        self._sigma_list: list[float] = []
        self._step_index: int = 0
        self._prev_x0: torch.Tensor | None = None  # data prediction of the previous step (m1 in the paper)

    # ---------------------------------------------------------------- grid
    def set_timesteps(self, sigmas: torch.Tensor) -> None:
        """Set the grid (strictly decreasing sigmas in (0, 1]); append ``final_sigma``; reset ALL state."""
        sigmas = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64)
        if sigmas.ndim != 1 or sigmas.numel() == 0:
            raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
        if not torch.isfinite(sigmas).all():
            raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
        if sigmas.max() > 1.0 or sigmas.min() <= self.config.final_sigma:
            raise ValueError(f"sigmas must lie in (final_sigma={self.config.final_sigma}, 1], got {sigmas.tolist()}")
        if sigmas.numel() > 1 and not (sigmas[1:] < sigmas[:-1]).all():
            raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")

        final = torch.tensor([self.config.final_sigma], dtype=torch.float64)
        self._sigmas = torch.cat([sigmas, final])  # (n+1,), CPU: avoids CPU/GPU traffic per step
        self._sigma_list = self._sigmas.tolist()
        self._step_index = 0
        self._prev_x0 = None

    @property
    def sigmas(self) -> torch.Tensor:
        """The grid plus the final sigma, shape (n+1,), float64 on the CPU."""
        if self._sigmas is None:
            raise RuntimeError("FlowDPMSolver.set_timesteps(sigmas) must be called before reading sigmas")
        return self._sigmas

    @property
    def timesteps(self) -> torch.Tensor:
        """The sigmas at which the model is evaluated, shape (n,) (= ``sigmas[:-1]``)."""
        return self.sigmas[:-1]

    @property
    def num_steps(self) -> int:
        """Number of ``step`` calls one run takes (0 before ``set_timesteps``)."""
        return max(len(self._sigma_list) - 1, 0)

    @property
    def step_index(self) -> int:
        """Index of the next step; equals ``num_steps`` once the run is finished."""
        return self._step_index

    # ---------------------------------------------------------------- step
    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from ``sigmas[i]`` to ``sigmas[i+1]`` given the model's velocity at ``sigmas[i]``."""
        if self._sigmas is None:
            raise RuntimeError("FlowDPMSolver.step called before set_timesteps(sigmas)")
        i = self._step_index
        if i >= self.num_steps:
            raise RuntimeError(
                f"FlowDPMSolver.step called {i + 1} times but the grid has only {self.num_steps} steps; "
                "call set_timesteps again to start a new run"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} must equal sample shape {tuple(sample.shape)}")

        out_dtype = sample.dtype
        work_dtype = torch.promote_types(sample.dtype, torch.float32)  # float32, or float64 if given
        x = sample.to(work_dtype)
        s0 = self._sigma_list[i]  # current sigma
        t = self._sigma_list[i + 1]  # target sigma

        m0 = x - s0 * velocity.to(work_dtype)  # x0_pred: data prediction at s0
        last = i == self.num_steps - 1
        if last and t == 0.0:
            # lambda(0) = +inf: the first-order update collapses to x0_pred exactly.
            prev_sample = m0
        elif i == 0 or last or self._sigma_list[i - 1] == 1.0:
            prev_sample = self._first_order(x, m0, s0, t)
        else:
            prev_sample = self._second_order(x, m0, self._prev_x0, self._sigma_list[i - 1], s0, t)

        self._prev_x0 = m0
        self._step_index = i + 1
        return prev_sample.to(out_dtype)

    @staticmethod
    def _first_order(x: torch.Tensor, m0: torch.Tensor, s: float, t: float) -> torch.Tensor:
        """DPM-Solver++(1) from s to t: ``(sigma_t/sigma_s) x + alpha_t (1 - exp(-h)) m0`` (finite form)."""
        alpha_s, alpha_t = 1.0 - s, 1.0 - t
        return (t / s) * x + (alpha_t - t * alpha_s / s) * m0

    @staticmethod
    def _second_order(
        x: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor, s1: float, s0: float, t: float
    ) -> torch.Tensor:
        """DPM-Solver++(2M), midpoint form (paper Alg. 2), from s0 to t with the previous point s1.

        ``h = lambda_t - lambda_s0``, ``r0 = (lambda_s0 - lambda_s1) / h``, ``D0 = m0``,
        ``D1 = (m0 - m1) / r0``, ``x_t = (sigma_t/sigma_s0) x - alpha_t (exp(-h) - 1) (D0 + D1 / 2)``.
        Needs 0 < t < s0 < s1 < 1 (all lambdas finite); ``step`` routes the other cases to first order.
        """

        def lam(s: float) -> float:
            return math.log((1.0 - s) / s)

        h = lam(t) - lam(s0)
        r0 = (lam(s0) - lam(s1)) / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        alpha_t = 1.0 - t
        return (t / s0) * x - (alpha_t * math.expm1(-h)) * (d0 + 0.5 * d1)
