"""The rollout worker: the Ray shell around `Sampler` (actors/sampler.py), one per rollout GPU.

Each call carries the weights it must sample with (`PublishedWeights`, handed over by the driver); the worker loads them
in place when its version differs, checks that its policy then computes what the learner's does
(motionnft_core/models/parity.py), and returns each group's training sample, its decoded images and small metadata as
separate objects, so reward workers never fetch latents and learners never fetch images. Evaluation edits (the
pipeline's own sampler, actors/eval_sampler.py) are made here too, with the published weights during training or a
checkpoint's export for evaluation.main compare, so they run where and as the rollouts do.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import ray
import torch

from actors.eval_sampler import EvalSampler
from actors.sampler import Prompt, ReferenceForwards, Sampler
from motionnft_core import telemetry
from motionnft_core.config import EvalConfig, RolloutConfig
from motionnft_core.faults import fault_point
from motionnft_core.models.parity import ParityError, ParityProbe, check_parity
from motionnft_core.models.policy import EditPolicy
from motionnft_core.models.weights import (
    SAMPLE,
    LoraExport,
    PolicyWeights,
    PublishedWeights,
    WeightManifest,
    check_lora_export,
    lora_export_here,
    read_lora_export,
)
from motionnft_core.net import whereabouts


class RolloutWorker:
    """Wrap at the call site: `ray.remote(num_gpus=g)(RolloutWorker)`."""

    def __init__(
        self,
        name: str,
        build_policy: Callable[[], EditPolicy],
        cfg: RolloutConfig,
        weight_kind: str,
        reference: ReferenceForwards | None = None,
    ) -> None:
        telemetry.bind("rollout", name)
        policy = build_policy()
        self.name, self.cfg = name, cfg
        self.busy = telemetry.Busy()
        self.weights = PolicyWeights(policy, weight_kind)
        self.sampler = Sampler(policy, cfg, reference)
        self.probe = ParityProbe.build(policy, cfg) if cfg.parity_check else None
        self.parity_error: float | None = None  # of the version loaded last
        self.export: str | None = None  # the location of the checkpoint export loaded last, if that is what it holds

    def ready(self) -> str:
        return self.name

    def where(self) -> str:
        return f"{self.name}: {whereabouts()}"

    def load(self, weights: PublishedWeights, tensors: dict[str, torch.Tensor]) -> None:
        """Load a published version, then check that the policy computes what the learner's does (when the
        learner sent its probe output): on a mismatch nothing samples until a later version passes."""
        with telemetry.timed("load_weights"):
            self.weights.load(weights.version, weights.manifest, tensors, weights.purpose)
            self.export = None
            self._check_parity(weights)
        telemetry.count(telemetry.WEIGHT_BYTES, sum(t.nbytes for t in tensors.values()))

    def _check_parity(self, weights: PublishedWeights) -> None:
        if self.probe is None or weights.probe is None:
            return
        policy = self.weights.policy
        tolerance = self.cfg.parity_tolerance[str(policy.dtype).removeprefix("torch.")]
        try:
            self.parity_error = check_parity(policy, self.probe, weights.probe, WeightManifest.unpack(weights.manifest),
                                             tolerance, worker=self.name)  # fmt: skip
        except ParityError:
            self.weights.forget()  # the next call loads (and checks) again
            raise

    def prepare(self, weights: PublishedWeights) -> float | None:
        """Before a worker joining an elastic pool takes work: load `weights` and pass the parity check (also when
        its version is the one the worker started with); returns the error measured."""
        if not self.weights.holds(weights):
            self.load(weights, ray.get(weights.tensors))
        elif self.parity_error is None:
            self._check_parity(weights)
        return self.parity_error

    def sample(self, step: int, weights: PublishedWeights, *prompts: Prompt) -> list[Any]:
        """[group, images, meta] per prompt, flat; call with `.options(num_returns=3 * len(prompts))`.

        Three objects so each consumer fetches only its part: the learner the GroupSample, the reward worker
        the images, the driver the small metadata (version, timings, parity error).
        """
        began = time.time()  # wall clock: the driver compares it with its own (learner/driver/elastic.py)
        if weights.purpose != SAMPLE:
            raise ValueError(f"rollouts sample with the sampling policy, not {weights.purpose} weights")
        with self.busy.call():
            fault_point("rollout.sample", step)
            if not self.weights.holds(weights):
                with telemetry.timed("fetch_weights"):
                    tensors = ray.get(weights.tensors)
                self.load(weights, tensors)
            pairs = self.sampler.sample(list(prompts), step, weights.version)
        telemetry.seconds("sample", pairs[0][0].timing["total_s"])  # the whole call: every group of it
        telemetry.count(telemetry.SAMPLES, sum(len(images) for _, images in pairs))
        done = time.time()
        meta = {"worker": self.name, "parity_error": self.parity_error, "done_at": done, "call_s": done - began}
        return [x for g, images in pairs for x in (g, images, {"version": g.version, "seeds": g.seeds,
                                                               "digests": image_digests(images), **meta, **g.timing})]

    def load_export(self, export: LoraExport) -> None:
        """Evaluation of a checkpoint (evaluation.main compare, through `edit`): its diffusers LoRA export (a
        dir, or an s3:// prefix downloaded here), read on this worker's node, into the adapter in place.
        It holds no published version afterwards: the next published weights load."""
        with lora_export_here(export.location, cache_dir=export.cache_dir, retry=export.retry) as lora_dir:
            check_lora_export(lora_dir, rank=export.rank, alpha=export.alpha)
            self.weights.policy.load_lora_state_dict(read_lora_export(self.weights.policy, lora_dir))
        self.weights.forget()
        self.parity_error, self.export = None, export.location

    def edit(self, how: EvalConfig | RolloutConfig, example: Prompt, weights: PublishedWeights | None = None,
             base: bool = False, export: LoraExport | None = None) -> torch.Tensor:  # fmt: skip
        """One evaluation edit of `example`, uint8 (3, H, W): made by the pipeline's own sampler with `eval.*`
        (actors/eval_sampler.py), or, given rollout settings, by the rollout solver as training samples it (one
        candidate, its noise a function of `how.seed` and the row's id). With `weights` (loaded first when their
        version differs), or a checkpoint's `export` (loaded first unless it is the one this worker holds: so a
        worker Ray restarted, which starts with an empty adapter, loads it again before it edits), or neither
        (what the policy holds); with `base`, by the base policy (the LoRA adapter off). The same row gives the
        same edit on any worker."""
        with self.busy.call():
            if weights is not None and not self.weights.holds(weights):
                with telemetry.timed("fetch_weights"):
                    tensors = ray.get(weights.tensors)
                self.load(weights, tensors)
            if export is not None and export.location != self.export:
                self.load_export(export)
            if base and self.weights.kind != "lora":
                raise ValueError("base-policy edits need a LoRA policy (with nft.full_finetune the base is gone)")
            policy = self.weights.policy
            with telemetry.timed("eval_sample"), policy.adapters_disabled() if base else nullcontext():
                if isinstance(how, RolloutConfig):
                    ((_, images),) = Sampler(policy, how).sample([example], step=0, version=0, group_size=1)
                    return images[0].cpu()
                return EvalSampler(policy, how).sample(example.prompt, example.input_image, example.reference_images)


def image_digests(images: torch.Tensor) -> list[str]:
    """A short sha256 of each candidate's uint8 pixels: what a replay from the lineage must reproduce exactly."""
    return [hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()[:16] for image in images.cpu()]
