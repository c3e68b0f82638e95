"""Supervised warm start of the CPU demo pipeline on synthetic motion pairs, so that RL starts from a policy that edits.

A randomly initialised pipeline produces noise, and the flow reward of noise says nothing about motion. Before
the RL phase the pipeline is fitted to the training pairs in two supervised stages (never on the held-out split):

1. **VAE** (autoencoding): encoder and decoder learn to reconstruct the training images (inputs and targets),
   MSE in [-1, 1] on the latent mode (the pipelines encode with `sample_mode="argmax"`). Then `shift_factor`
   and `scaling_factor` are set from the latent mean and std over those images, so the transformer sees
   unit-scale latents, as with the real FLUX VAE.
2. **Transformer** (rectified flow matching): x0 = latents of the TARGET image, conditioning = (instruction,
   input image), `loss = ||v_θ(x_t, t, c) − (ε − x0)||²` at `x_t = (1 − t)·x0 + t·ε`; t uniform, mapped through
   the scheduler's time shift for this image size (the mu that shifts the rollout grid). All transformer
   weights train; AdamW, linear warm-up, cosine decay to 10 %.

**No-op demonstrations.** With probability `noop_fraction` a flow-matching sample's target is the INPUT image
(an edit that does nothing), as real edit data holds failed or partial edits. The warm-started policy therefore
moves objects only part of the way or not at all, and the motion reward alone must teach it to follow the
instruction. Measured on the demo task (32 px, "move the <object> N pixels to the right"): with no-op
demonstrations RL raises the held-out flow score; without them the warm start is already as good as this tiny
model gets within the budget and RL leaves the held-out score flat (notes in the issue-6 report).

The result is saved with `save_pretrained` and loads as `model.path` of a normal run. Everything is seeded: the
same inputs give the same weights on the same machine. `warmstart.json` next to `model_index.json` records the
settings and the loss curves; a finished directory is reused as it is.

`prepare_demo` builds everything the demo needs under `<cache_dir>/demo/` (data of one motion kind, the random
demo pipeline of `models/demo.py`, the warm start); a run with `demo.enabled` calls it through
`resolve_demo`. CLI: ``python -m models.warmstart --config configs/learn_demo.yaml [key=value ...]`` builds it
ahead of a run and prints the `data.source` and `model.path` it trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import DEMO_MOTIONS, Config
from models.policy import Conditioning, EditPolicy

RECORD_NAME = "warmstart.json"


@dataclass(frozen=True)
class WarmStartSettings:
    """Everything the warm start does; recorded in warmstart.json."""

    vae_steps: int = 600  # autoencoder steps (0 = keep the VAE as it is)
    vae_lr: float = 2e-3
    vae_batch: int = 16
    steps: int = 400  # flow-matching steps of the transformer
    lr: float = 3e-3
    noop_fraction: float = 0.6  # share of flow-matching samples whose target is the input (a no-op edit)
    batch: int = 32
    warmup: int = 20  # linear warm-up steps of both stages
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    max_sequence_length: int = 48  # T5 tokens (Kontext); the synthetic instructions need <= 44
    guidance: float = 2.5  # Kontext distilled guidance, as in rollouts and NFT training

    def __post_init__(self) -> None:
        for key in ("vae_steps", "steps", "warmup"):
            if getattr(self, key) < 0:
                raise ValueError(f"warm start {key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.noop_fraction < 1.0:
            raise ValueError(f"warm start noop_fraction must be in [0, 1), got {self.noop_fraction}")
        for key in ("vae_lr", "lr", "vae_batch", "batch", "grad_clip", "max_sequence_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"warm start {key} must be > 0, got {getattr(self, key)}")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0.1 at `total` (a pure function of step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _images(dataset: Sequence, which: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) of `which` ("input_image" | "target_image") of every example."""
    return torch.stack([getattr(dataset[i], which) for i in range(len(dataset))])


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ stage 1: VAE


def _optimize(
    params: list[torch.Tensor],
    loss: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    s: WarmStartSettings,
    stage: str,
    log: list[float],
) -> None:
    """Both stages' loop: AdamW on `loss()` with warm-up + cosine (`lr_factor`), grad clipping, loss log, progress."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, s.warmup)
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        log.append(value.item())
        _progress(stage, step, steps, log)


def fit_vae(policy: EditPolicy, images: torch.Tensor, s: WarmStartSettings, log: list[float]) -> None:
    """Autoencode `images` (uint8 (N, 3, H, W)) through the policy's VAE; then set its latent normalisation."""
    vae = policy.vae
    g = torch.Generator().manual_seed(s.seed)
    if s.vae_steps > 0:

        def loss() -> torch.Tensor:
            x = _to_unit(images[torch.randint(0, len(images), (s.vae_batch,), generator=g)])
            return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)

        vae.train().requires_grad_(True)
        _optimize(list(vae.parameters()), loss, steps=s.vae_steps, lr=s.vae_lr, s=s, stage="vae", log=log)
        vae.eval().requires_grad_(False)
    # Latent statistics over the training images: the transformer works on (z - shift) * scale ~ unit scale.
    with torch.no_grad():
        z = torch.cat([vae.encode(_to_unit(images[i : i + 64])).latent_dist.mode() for i in range(0, len(images), 64)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


# ---------------------------------------------------------------------------------------- stage 2: flow matching


def shifted_times(u: torch.Tensor, mu: float) -> torch.Tensor:
    """The schedulers' exponential time shift `e^mu / (e^mu + 1/u - 1)` of uniform u in (0, 1]."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def shift_mu(policy: EditPolicy, height: int, width: int) -> float:
    """mu of the policy's dynamic shift at this image size (what `EditPolicy.sigmas` uses)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    c = policy.pipe.scheduler.config
    return calculate_shift(
        policy.seq_len(height, width),
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )


@torch.no_grad()
def encode_pairs(policy: EditPolicy, dataset: Sequence, chunk: int = 32) -> tuple[Conditioning, torch.Tensor]:
    """Conditioning of every (instruction, input) and the packed latents x0 (N, L, D) of every target."""
    conds, targets = [], []
    for start in range(0, len(dataset), chunk):
        rows = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
        prompts = [r.prompt for r in rows]
        conds.append(policy.encode(prompts, torch.stack([r.input_image for r in rows])))
        # The target's packed latents are exactly what `encode` makes of an input image.
        targets.append(policy.encode(prompts, torch.stack([r.target_image for r in rows])).tensors["image_latents"])
    return Conditioning.cat(conds), torch.cat(targets)


def fit_transformer(
    policy: EditPolicy, cond: Conditioning, x0: torch.Tensor, s: WarmStartSettings, log: list[float]
) -> None:
    """Rectified flow matching of all transformer weights on (cond, x0) pairs."""
    tr = policy.transformer
    g = torch.Generator().manual_seed(s.seed + 1)
    mu = shift_mu(policy, cond.height, cond.width)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, x0.shape[0], (s.batch,), generator=g)
        noop = torch.rand(s.batch, generator=g) < s.noop_fraction
        x0_b = torch.where(noop[:, None, None], cond.tensors["image_latents"][idx], x0[idx])
        eps = torch.randn(x0_b.shape, generator=g)
        t = shifted_times(torch.rand(s.batch, generator=g).clamp_min(1e-3), mu)
        x_t = (1 - t[:, None, None]) * x0_b + t[:, None, None] * eps
        return F.mse_loss(policy.velocity(x_t, t, cond.select(idx)).float(), eps - x0_b)

    tr.train().requires_grad_(True)
    _optimize(list(tr.parameters()), loss, steps=s.steps, lr=s.lr, s=s, stage="flow matching", log=log)
    tr.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ entry


def warm_start(
    model_dir: str | os.PathLike,
    train_set: Sequence,
    out_dir: str | os.PathLike,
    settings: WarmStartSettings | None = None,
    *,
    family: str = "flux_kontext",
) -> Path:
    """Fit the pipeline at `model_dir` to `train_set` (MotionExamples at the training resolution) and save it to
    `out_dir`; returns `out_dir`. An `out_dir` that already holds a finished warm start is returned as is."""
    s = settings or WarmStartSettings()
    out_dir = Path(out_dir)
    if (out_dir / RECORD_NAME).is_file() and (out_dir / "model_index.json").is_file():
        return out_dir
    if len(train_set) == 0:
        raise ValueError("warm start: the training set is empty")
    torch.manual_seed(s.seed)
    kwargs = {"guidance_scale": s.guidance, "max_sequence_length": s.max_sequence_length}
    policy = EditPolicy.from_pretrained(model_dir, family=family, **(kwargs if family == "flux_kontext" else {}))
    t0 = time.perf_counter()
    vae_log: list[float] = []
    fit_vae(policy, torch.cat([_images(train_set, "input_image"), _images(train_set, "target_image")]), s, vae_log)
    t_vae = time.perf_counter() - t0
    cond, x0 = encode_pairs(policy, train_set)
    fm_log: list[float] = []
    fit_transformer(policy, cond, x0, s, fm_log)
    record = {
        "settings": asdict(s),
        "base": str(model_dir),
        "family": family,
        "n_train": len(train_set),
        "vae_loss": _summary(vae_log),
        "fm_loss": _summary(fm_log),
        "vae_s": round(t_vae, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        policy.pipe.save_pretrained(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_text_length(policy: EditPolicy, model_dir: str | os.PathLike) -> None:
    """Raise if `policy` pads its T5 text to another length than the warm start at `model_dir` trained with.

    FLUX attends to the padding tokens too, so a transformer fitted on 48-token text sees other inputs at 512
    tokens (the pipeline default): the policy must be built with the recorded `max_sequence_length`.
    """
    record = Path(model_dir) / RECORD_NAME
    if not record.is_file() or policy.family != "flux_kontext":
        return  # not a warm-started pipeline, or a family without T5 padding (Qwen-Image-Edit)
    trained = json.loads(record.read_text())["settings"]["max_sequence_length"]
    if policy.max_sequence_length != trained:
        raise ValueError(
            f"{model_dir} was warm-started with max_sequence_length={trained}, but the policy pads text to "
            f"{policy.max_sequence_length}; build it with max_sequence_length={trained} (model.max_sequence_length)"
        )


def _progress(stage: str, step: int, total: int, log: list[float], every: int = 100) -> None:
    """A line every `every` steps and at the end: the warm start takes minutes on a CPU."""
    if (step + 1) % every == 0 or step + 1 == total:
        recent = log[-every:]
        print(f"warm start {stage}: step {step + 1}/{total}  loss {sum(recent) / len(recent):.5f}", flush=True)


def _summary(log: list[float], points: int = 10) -> list[float]:
    """Mean loss over `points` equal slices of the run (a short loss curve for the record)."""
    if not log:
        return []
    return [round(float(np.mean(part)), 5) for part in np.array_split(np.asarray(log), min(points, len(log)))]


# ------------------------------------------------------------------------------------------------ the CPU demo

MOTIONS = DEMO_MOTIONS


def _matches(example, motion: str) -> bool:
    """Whether a synthetic example is of the demo's motion kind (a translation direction, any translation, any)."""
    if motion == "any":
        return True
    if example.motion_rot != 0.0:
        return False
    if motion == "translate":
        return True
    from data.synthetic import DIRECTIONS

    ux, uy = DIRECTIONS[motion]
    return example.motion_dx * ux + example.motion_dy * uy > 0  # the move points the named way


def demo_data(out_dir: str | os.PathLike, n: int, *, size: int, seed: int, motion: str = "right") -> Path:
    """The first `n` synthetic examples (`data.synthetic.make_example(seed, i, size)`, i = 0, 1, ...) whose
    motion is `motion`, as a JSONL manifest with PNGs; ids and truth columns as the generator writes them.
    Reused when present. Returns the manifest path."""
    from PIL import Image

    from data.synthetic import JSONL_NAME, make_example

    if motion not in MOTIONS:
        raise ValueError(f"demo motion must be one of {MOTIONS}, got {motion!r}")
    if n < 1:
        raise ValueError(f"demo examples must be >= 1, got {n}")
    out_dir = Path(out_dir)
    if (out_dir / JSONL_NAME).is_file():
        return out_dir / JSONL_NAME
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        rows, index = [], 0
        while len(rows) < n:
            ex = make_example(seed, index, size)
            index += 1
            if not _matches(ex, motion):
                continue
            paths = [f"images/{ex.id}_input.png", f"images/{ex.id}_target.png"]
            Image.fromarray(ex.input_image).save(tmp / paths[0])
            Image.fromarray(ex.target_image).save(tmp / paths[1])
            rows.append({"id": ex.id, "prompt": ex.prompt, "image": paths, "category": ex.category,
                         "motion_dx": ex.motion_dx, "motion_dy": ex.motion_dy, "motion_rot": ex.motion_rot,
                         "object_shape": ex.object_shape, "object_color": ex.object_color,
                         "object_x": ex.object_x, "object_y": ex.object_y})  # fmt: skip
        (tmp / JSONL_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / JSONL_NAME).is_file():  # another process won the race: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / JSONL_NAME


@dataclass(frozen=True)
class DemoPaths:
    data: Path  # JSONL manifest: data.source of the run
    model: Path  # warm-started pipeline: model.path of the run


def prepare_demo(
    cache_dir: str | os.PathLike,
    *,
    examples: int,
    size: int,
    data_seed: int,
    motion: str,
    eval_fraction: float,
    split_seed: int,
    model_seed: int,
    settings: WarmStartSettings,
) -> DemoPaths:
    """Data and warm-started policy of the CPU demo, built once under `<cache_dir>/demo/` and reused.

    The warm start sees only the training side of `MotionEditDataset.split(eval_fraction, split_seed)` at
    `size` x `size`, the split the run itself makes (learner.loop.load_data), so the held-out examples stay
    unseen. The warm-started directory's name hashes everything that determines its weights.
    """
    from data.motionedit import MotionEditDataset
    from models.demo import DemoSizes, build_demo_flux_kontext

    root = Path(cache_dir).expanduser() / "demo"
    data = demo_data(root / f"data_{motion}_n{examples}_s{size}_seed{data_seed}", examples, size=size,
                     seed=data_seed, motion=motion)  # fmt: skip
    sizes = DemoSizes()
    key = json.dumps({"data": str(data), "eval_fraction": eval_fraction, "split_seed": split_seed,
                      "model_seed": model_seed, "sizes": asdict(sizes), "settings": asdict(settings)},
                     sort_keys=True)  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    sizes_digest = hashlib.sha256(json.dumps(asdict(sizes), sort_keys=True).encode()).hexdigest()[:8]
    base = build_demo_flux_kontext(root / f"base_seed{model_seed}_{sizes_digest}", seed=model_seed, sizes=sizes)
    out = root / f"warm_{digest}"
    if not (out / RECORD_NAME).is_file():
        train, _ = MotionEditDataset.from_source(data, resolution=(size, size)).split(eval_fraction, split_seed)
        warm_start(base, train, out, settings)
    return DemoPaths(data=data, model=out)


def resolve_demo(cfg: Config) -> Config:
    """A run with `demo.enabled`: build (or reuse) the demo data and warm-started pipeline, and return the config
    that trains them: `model.path` and `data.source` filled in, `demo.enabled` false (resolved).

    The resolved config is what a run saves (`<logging.dir>/config.json`), so `learner.evaluate --run` loads
    exactly the pipeline and data that were trained. Without `demo.enabled` the config is returned as it is.
    """
    if not cfg.demo.enabled:
        return cfg
    d, m = cfg.demo, cfg.model
    settings = WarmStartSettings(
        vae_steps=d.vae_steps, vae_lr=d.vae_lr, vae_batch=d.vae_batch, steps=d.steps, lr=d.lr, batch=d.batch,
        noop_fraction=d.noop_fraction, seed=d.seed, max_sequence_length=m.max_sequence_length, guidance=m.guidance,
    )  # fmt: skip
    print(f"demo: {d.examples} '{d.motion}' examples at {cfg.rollout.height} px and the warm-started demo "
          f"pipeline under {Path(m.cache_dir).expanduser() / 'demo'} (built on first use, ~2 min; then reused)",
          flush=True)  # fmt: skip
    paths = prepare_demo(
        m.cache_dir, examples=d.examples, size=cfg.rollout.height, data_seed=cfg.data.seed, motion=d.motion,
        eval_fraction=cfg.data.eval_fraction, split_seed=cfg.data.seed, model_seed=d.model_seed, settings=settings,
    )  # fmt: skip
    print(f"demo: data.source={paths.data} model.path={paths.model}", flush=True)
    return replace(
        cfg,
        model=replace(m, path=str(paths.model)),
        data=replace(cfg.data, source=str(paths.data)),
        demo=replace(d, enabled=False),
    )


def main(argv: list[str] | None = None) -> int:
    """Build the demo of a config ahead of a run (e.g. on a head node) and print the paths it trains."""
    from common.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m models.warmstart", description=main.__doc__)
    parser.add_argument("--config", required=True, help="a config with demo.enabled: true (configs/learn_demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not cfg.demo.enabled:
        print(f"config error: demo.enabled: {args.config} does not enable the demo; nothing to build", file=sys.stderr)
        return 2
    resolved = resolve_demo(cfg)
    print(f"data.source={resolved.data.source}\nmodel.path={resolved.model.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
