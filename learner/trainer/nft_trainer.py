"""The NFT trainer: one torch.distributed rank's share of a step on an FSDP2-sharded transformer (docs/algorithm.md).

One transformer carries two peft adapters: "default" is θ (trained) and "old" is the sampling policy (an EMA of θ,
docs/algorithm.md); v_ref is the base model with adapters disabled. Recipe and pitfalls (docs/algorithm.md, checked on
FSDP2): reshard every FSDP module before switching adapters, because `set_adapter` flips `requires_grad` only on the
parameters registered at that moment; build optimizer and EMA lists once, by name; update sharded parameters in place
(`lerp_`, `copy_`) on their local shards.

`NFTTrainer` is plain: tests and bench/ run it without Ray; learner/trainer/fsdp_worker.py is its Ray shell (one
actor per rank) and the group that places the ranks and fans each driver call out to all of them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from learner.trainer.memory import MemoryGauge, fit_micro_batch
from learner.trainer.motion_focal import token_weights
from learner.trainer.nft_loss import ema_decay, nft_loss, old_policy_decay
from motionnft_core.config import LearnerConfig, NFTConfig
from motionnft_core.models.parity import ParityProbe
from motionnft_core.models.policy import Conditioning, EditPolicy
from motionnft_core.noise import noised, training_draws, training_seed

THETA, OLD, REF = "default", "old", "ref"
EMA = "ema"  # the eval EMA: `gather(EMA)` for exports
LOSS_KEYS = ("loss", "policy_loss", "kl_loss", "loss_pos", "loss_neg")  # per-step means, summed over ranks


@contextlib.contextmanager
def _expected_warnings() -> Iterator[None]:
    """Silence the two warnings this trainer causes by design, only where it causes them: peft's second
    adapter on one model (θ and old are meant to share it), and FSDP2's note that a forward returned a view
    (our forward outputs are never modified in place, which is what it warns about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        yield


@dataclass
class TrainSample:
    """One candidate to train on: its clean latent, its prompt's conditioning and its optimality r."""

    prompt_id: str
    k: int
    x0: torch.Tensor  # (L, D)
    cond: Conditioning  # batch 1
    sigmas: torch.Tensor  # (num_steps,) the rollout grid
    r: float
    valid: bool = True
    v_old: torch.Tensor | None = None  # (T, L, D) from the rollout, in training_draws order (reference_forwards)
    v_ref: torch.Tensor | None = None
    heat: torch.Tensor | None = None  # (H, W) |input->target flow| of its prompt (nft.motion_focal)


def train_sample(group: Any, k: int, r: float, valid: bool = True, heat: torch.Tensor | None = None) -> TrainSample:
    """Candidate k of a rollout's GroupSample, with the reference velocities when the rollout computed them and
    its prompt's motion heat when the reward side sent one."""
    ref = group.reference
    return TrainSample(
        group.prompt_id, k, group.x0[k], group.cond, group.sigmas, r, valid,
        v_old=None if ref is None else ref["v_old"][k], v_ref=None if ref is None else ref["v_ref"][k], heat=heat,
    )  # fmt: skip


def rank_micro_batches(n: int, world: int, rank: int, micro_batch: int) -> list[list[int]]:
    """Sample indices of this rank's micro-batches, -1 = padding.

    Every rank runs the same number of micro-batches (FSDP collectives run in lock step), so a rank with
    fewer samples pads with -1 entries that the trainer fills with zero-weight copies.
    """
    per_rank = -(-n // world)
    n_batches = max(1, -(-per_rank // micro_batch))
    mine = list(range(rank, n, world))
    mine += [-1] * (n_batches * micro_batch - len(mine))
    return [mine[i * micro_batch : (i + 1) * micro_batch] for i in range(n_batches)]


def rank_share(samples: Sequence[TrainSample | None], world: int, rank: int, micro_batch: int) -> list[TrainSample]:
    """This rank's samples of a step in micro-batch order (`rank_micro_batches`), padded with zero-weight copies
    of its first sample (r = 0.5, valid=False) so that every rank runs the same FSDP collectives.

    `samples` holds all n samples of the step; entries other ranks train on may be None (never fetched)."""
    idx = [i for mb in rank_micro_batches(len(samples), world, rank, micro_batch) for i in mb]
    mine = [samples[i] for i in idx if i >= 0]
    pad = dataclasses.replace(mine[0] if mine else samples[0], r=0.5, valid=False)
    return [samples[i] if i >= 0 else pad for i in idx]


class NFTTrainer:
    """θ, the old policy, the eval EMA and AdamW of one rank, set up by `nft.*` and `learner.*`.

    `mixed_precision`: bf16 compute with fp32 gradient reduction (GPU runs with a 16-bit `model.dtype`).
    """

    def __init__(
        self, policy: EditPolicy, nft: NFTConfig, learner: LearnerConfig, *, mixed_precision: bool = False
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("NFTTrainer needs torch.distributed initialised (init_process_group), world 1 is fine")
        self.policy, self.nft, self.learner = policy, nft, learner
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        tr = policy.transformer
        self.frozen: dict[str, torch.nn.Module] = {}  # full fine-tuning: the old policy and the reference
        if nft.full_finetune:
            self.frozen = {OLD: copy.deepcopy(tr), REF: copy.deepcopy(tr)}  # before sharding: same weights
        else:
            # θ's Gaussian init is a function of the seed alone: identical on every rank (each rank shards its
            # own copy, so differing inits would stitch θ together from different draws) and across world sizes.
            with torch.random.fork_rng(devices=[]), _expected_warnings():
                torch.manual_seed(learner.seed)
                for name in (THETA, OLD):
                    policy.add_lora(
                        rank=nft.lora_rank, alpha=nft.lora_alpha, target_modules=list(nft.lora_targets),
                        adapter_name=name,
                    )  # fmt: skip
            policy.load_lora_state_dict(policy.lora_state_dict(THETA), adapter_name=OLD)  # old = θ at the start
            tr.set_adapter(THETA)
        if learner.activation_checkpointing:
            tr.enable_gradient_checkpointing()
        # Process-wide by nature (torch.backends): this process trains, and the backward is what crashes.
        torch.backends.cuda.enable_cudnn_sdp(learner.cudnn_sdpa)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
        for module in (tr, *self.frozen.values()):
            _shard(module, mp)
        self.fsdp_modules = [m for module in (tr, *self.frozen.values()) for m in module.modules()
                             if isinstance(m, FSDPModule)]  # fmt: skip
        if learner.compile:  # after sharding: the compiled forwards run inside FSDP's hooks
            policy.compile_blocks()
            for frozen in self.frozen.values():
                _compile_frozen(policy, frozen)
        named = dict(tr.named_parameters())
        if nft.full_finetune:
            self.theta = named
            self.old = dict(self.frozen[OLD].named_parameters())
        else:
            self.theta = {n: p for n, p in named.items() if f".{THETA}." in n and "lora_" in n}
            self.old = {n: named[n.replace(f".{THETA}.", f".{OLD}.")] for n in self.theta}
        if not self.theta:
            raise RuntimeError(f"no LoRA parameters matched nft.lora_targets {nft.lora_targets}")
        self._set_trainable()
        self.optimizer = torch.optim.AdamW(
            list(self.theta.values()), lr=nft.lr, betas=(nft.adam_beta1, nft.adam_beta2), weight_decay=nft.weight_decay
        )
        with torch.no_grad():
            self.ema = {n: p.detach().clone().float() for n, p in self.theta.items()}
        self.step = 0  # optimizer steps done
        self.memory_probe: dict[str, int] | None = None  # what fit_micro_batch measured and chose

    # ------------------------------------------------------------------ adapters under FSDP2

    def _set_trainable(self) -> None:
        for module in (self.policy.transformer, *self.frozen.values()):
            for p in module.parameters():
                p.requires_grad_(False)
        for p in self.theta.values():
            p.requires_grad_(True)

    def _reshard(self) -> None:
        for m in self.fsdp_modules:
            m.reshard()

    @contextlib.contextmanager
    def _active(self, adapter: str | None) -> Iterator[None]:
        """Inside, the policy computes with adapter "old", or the base model (None); θ's flags are restored after."""
        if self.frozen:  # full fine-tuning: the frozen copies run in θ's place
            theta, self.policy.transformer = self.policy.transformer, self.frozen[adapter or REF]
            try:
                yield
            finally:
                self.policy.transformer = theta
            return
        tr = self.policy.transformer
        self._reshard()
        if adapter is None:
            tr.disable_adapters()
        else:
            tr.set_adapter(adapter)
        try:
            yield
        finally:
            self._reshard()
            if adapter is None:
                tr.enable_adapters()
            tr.set_adapter(THETA)
            self._set_trainable()

    @torch.no_grad()
    def _frozen_velocity(self, adapter: str | None, x_t, t, cond) -> torch.Tensor:
        """v_old (adapter "old") or v_ref (adapter None = base model), without touching θ's grads."""
        with self._active(adapter), _expected_warnings():
            return self.policy.velocity(x_t, t, cond)

    def probe_output(self, probe: ParityProbe) -> torch.Tensor:
        """The sampling policy ("old") on the weight-parity probe, float32 on the CPU; collective."""
        return self._frozen_velocity(OLD, probe.x_t, torch.tensor(probe.sigma), probe.cond).float().cpu()

    @contextlib.contextmanager
    def old_policy(self) -> Iterator[EditPolicy]:
        """The policy with the old adapter active, without grad: what a rollout colocated with this rank samples
        with (the GPU benchmark runs rollout and learner on one transformer this way)."""
        with torch.no_grad(), self._active(OLD), _expected_warnings():
            yield self.policy

    # ------------------------------------------------------------------ the micro-batch from free memory

    def fit_micro_batch(self, samples: list[TrainSample], per_rank: int, step: int, gauge: MemoryGauge) -> int:
        """`learner.micro_batch: 0`: forward/backward over 1, then 2 of this rank's `samples` (all timesteps, as a
        step does), the peak memory of each from `gauge`, the size from `learner.trainer.memory.fit_micro_batch`, the
        smallest over ranks (every rank must run the same micro-batches). The probes' gradients are dropped and no
        weight moves. Sets and returns `learner.micro_batch`; collective."""
        if len(samples) < 2:
            raise ValueError("fit_micro_batch needs 2 samples of this rank (pad with valid=False samples)")
        peaks = []
        for b in (1, 2):
            self.optimizer.zero_grad(set_to_none=True)
            gauge.reset()
            self._train_micro_batch(samples[:b], len(samples), step, dict.fromkeys(LOSS_KEYS, 0.0),
                                    {"forward_s": 0.0, "backward_s": 0.0})  # fmt: skip
            peaks.append(gauge.peak())
        self.optimizer.zero_grad(set_to_none=True)
        mine = fit_micro_batch(peaks[0], peaks[1], gauge.budget(self.learner.memory_fraction), per_rank)
        device = next(iter(self.theta.values())).device
        chosen = torch.tensor([mine], device=device)
        dist.all_reduce(chosen, op=dist.ReduceOp.MIN)
        self.learner = dataclasses.replace(self.learner, micro_batch=int(chosen.item()))
        self.memory_probe = {"peak_1": peaks[0], "peak_2": peaks[1], "mine": mine, "chosen": self.learner.micro_batch}
        return self.learner.micro_batch

    # ------------------------------------------------------------------ one training step

    def train_step(self, samples: list[TrainSample], n_global: int, step: int) -> dict[str, float]:
        """Accumulate the NFT loss over this rank's samples and all their timesteps; one AdamW step.

        Normalisation: the step's loss is the mean over all `n_global` valid samples (every rank) and their
        timesteps; FSDP averages gradients over ranks, hence the factor `world`.
        """
        t0 = time.perf_counter()
        if not samples:
            # Every rank must run the same FSDP collectives; an empty rank would leave the others waiting.
            raise ValueError("train_step needs at least one sample per rank (pad with valid=False samples)")
        self.optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        spent = {"forward_s": 0.0, "backward_s": 0.0}
        # Padding samples (valid=False) still run forward/backward with zero weight: every rank must issue the
        # same FSDP collectives (see rank_micro_batches).
        micro_batch = self.learner.micro_batch
        if micro_batch < 1:
            raise ValueError("learner.micro_batch is 0 (from free memory): fit_micro_batch sets it before a step")
        for start in range(0, len(samples), micro_batch):
            self._train_micro_batch(samples[start : start + micro_batch], n_global, step, sums, spent)
        n_local = sum(s.valid for s in samples)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.theta.values()), self.nft.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        self.step += 1
        decay = self._update_old_and_ema()
        out = {k: v for k, v in sums.items()}
        out.update(
            n_valid=float(n_local), grad_norm=float(grad_norm), old_decay=decay, train_s=time.perf_counter() - t0,
            **spent,
        )
        return out

    def _train_micro_batch(self, batch: list[TrainSample], n_global: int, step: int, sums: dict, spent: dict) -> None:
        """Forward and backward over every timestep of one micro-batch; adds the loss terms to `sums` and the
        seconds of the forwards (v_old, v_ref, v_θ, loss) and backwards to `spent`."""
        n = self.nft
        device = next(iter(self.theta.values())).device
        dtype = self.policy.dtype
        x0 = torch.stack([s.x0 for s in batch]).to(device, dtype)
        cond = Conditioning.cat([s.cond for s in batch]).to(device, dtype)
        r = torch.tensor([s.r for s in batch], dtype=torch.float64, device=device)
        valid = torch.tensor([s.valid for s in batch], dtype=torch.bool, device=device)
        draws = [
            training_draws(s.sigmas, s.x0.shape, fraction=n.timestep_fraction,
                           seed=training_seed(self.learner.seed, step, s.prompt_id, s.k))
            for s in batch
        ]  # fmt: skip
        times = torch.stack([t for t, _ in draws])  # (B, T)
        eps_all = torch.stack([e for _, e in draws])  # (B, T, L, D)
        # v_old / v_ref computed by the rollout that sampled these candidates (nft.reference_forwards: rollout)
        shipped = all(s.v_old is not None and s.v_ref is not None for s in batch)
        token_weight = self._token_weights(batch, device) if n.motion_focal else None
        n_t = times.shape[1]
        weight = float(valid.sum()) / max(n_global, 1) / n_t * self.world
        for j in range(n_t):
            t0 = time.perf_counter()
            eps = eps_all[:, j].to(device, dtype)
            t = times[:, j].to(device, dtype)
            x_t = noised(x0, eps, t)
            if shipped:
                v_old = torch.stack([s.v_old[j] for s in batch]).to(device, dtype)
                v_ref = torch.stack([s.v_ref[j] for s in batch]).to(device, dtype)
            else:
                v_old = self._frozen_velocity(OLD, x_t, t, cond)
                v_ref = self._frozen_velocity(None, x_t, t, cond)
            with _expected_warnings():
                v_theta = self.policy.velocity(x_t, t, cond)
            loss, m = nft_loss(
                v_theta.float(), v_old.float(), v_ref.float(), x_t.float(), x0.float(), t.float(), r, valid,
                beta=n.beta, adv_clip_max=n.adv_clip_max, kl_weight=n.kl_weight, token_weight=token_weight,
            )  # fmt: skip
            share = float(valid.sum()) / max(n_global, 1) / n_t
            for key in sums:  # float() waits for the forward's kernels: its time ends here
                sums[key] += float(m[key]) * share
            t1 = time.perf_counter()
            (loss * weight).backward()
            if device.type == "cuda":  # the backward's kernels (and FSDP's reduce-scatter), so its time is its own
                torch.cuda.synchronize(device)
            spent["forward_s"] += t1 - t0
            spent["backward_s"] += time.perf_counter() - t1

    def _token_weights(self, batch: list[TrainSample], device: torch.device) -> torch.Tensor:
        """nft.motion_focal: (B, L) weights of the target tokens from each sample's heat (motion_focal.py)."""
        rows = []
        for s in batch:
            if s.heat is None:
                raise ValueError(f"nft.motion_focal: prompt {s.prompt_id!r} came without its motion heat (the reward "
                                 "workers send it when nft.motion_focal is on)")  # fmt: skip
            grid = self.policy.latent_grid(*s.heat.shape)
            rows.append(token_weights(s.heat, grid, self.policy.pack_map, self.nft.motion_focal_mix))
        weights = torch.stack(rows)
        if weights.shape[1] != batch[0].x0.shape[0]:
            raise ValueError(f"nft.motion_focal: {weights.shape[1]} heat tokens for {batch[0].x0.shape[0]} latent "
                             "tokens (the heat must have the edit's pixel size)")  # fmt: skip
        return weights.to(device)

    @torch.no_grad()
    def _update_old_and_ema(self) -> float:
        """old <- d*old + (1-d)*θ and the eval EMA, on each rank's local shards (in place)."""
        d = old_policy_decay(self.step, schedule=self.nft.decay_schedule)
        e = ema_decay(self.step, cap=self.nft.ema_cap)
        for name, p in self.theta.items():
            local = _local(p)
            _local(self.old[name]).lerp_(local.to(self.old[name].dtype), 1.0 - d)
            _local(self.ema[name]).lerp_(local.float(), 1.0 - e)
        return d

    # ------------------------------------------------------------------ weights out

    def gather(self, which: str = OLD) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) adapter tensors, keyed as `EditPolicy.lora_state_dict`; collective, rank 0 gets them."""
        sources = {"old": self.old, "theta": self.theta, "ema": self.ema}
        if which not in sources:
            raise ValueError(f"gather: which must be one of {sorted(sources)}, got {which!r}")
        source = sources[which]
        out = {}
        for theta_name in self.theta:
            full = _full(source[theta_name])
            out[theta_name.replace(f".{THETA}.", ".")] = full.detach().to("cpu").clone()
        return out if self.rank == 0 else None

    def gather_dtypes(self) -> dict[str, torch.dtype]:
        """The policy's dtype of each tensor `gather` returns, by the same names (no communication)."""
        return {name.replace(f".{THETA}.", "."): p.dtype for name, p in self.theta.items()}

    # ------------------------------------------------------------------ checkpoint state (DCP)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {
            "theta": dict(self.theta),
            "old": {n: self.old[n] for n in self.theta},
            "ema": dict(self.ema),
            "optimizer": get_optimizer_state_dict(self.policy.transformer, self.optimizer),
            "step": torch.tensor(self.step),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state` is what `state_dict()` returned, loaded in place by DCP; pushes the optimizer part back."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.policy.transformer, self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        self._set_trainable()


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's `train_step`: the losses are each rank's share of the global mean
    (so they add up), n_valid adds up, grad_norm and old_decay are global already, the seconds (train_s,
    forward_s, backward_s) are the slowest rank's."""
    out = {k: sum(m[k] for m in per_rank) for k in (*LOSS_KEYS, "n_valid")}
    out["grad_norm"] = per_rank[0]["grad_norm"]
    out["old_decay"] = per_rank[0]["old_decay"]
    for key in ("train_s", "forward_s", "backward_s"):
        out[key] = max(m[key] for m in per_rank)
    return out


def _compile_frozen(policy: EditPolicy, frozen: torch.nn.Module) -> None:
    """Regional compilation of a full-fine-tuning frozen copy (old or reference transformer)."""
    theta, policy.transformer = policy.transformer, frozen
    try:
        policy.compile_blocks()
    finally:
        policy.transformer = theta


def _shard(module: torch.nn.Module, mp: MixedPrecisionPolicy | None) -> None:
    """fully_shard each transformer block, then the root (which keeps embeddings and heads)."""
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for blocks in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(module, blocks, []):
            fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
