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

`prepare_demo` builds everything the demo needs under `<cache_dir>/demo/` (data of one motion kind, the random demo
pipeline of `motionnft_core/models/demo.py`, the warm start); a run with `demo.enabled` calls it through `resolve_demo`.
CLI: ``python -m motionnft_core.models.warmstart --config configs/learn_demo.yaml [key=value ...]`` builds it ahead of a
run and prints the `data.source` and `model.path` it trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from motionnft_core.cache import build_atomically
from motionnft_core.config import DEMO_MOTIONS, Config, DemoConfig, ModelConfig
from motionnft_core.config_loader import load_config_or_exit
from motionnft_core.data.motionedit import MotionEditDataset
from motionnft_core.data.synthetic import DIRECTIONS, JSONL_NAME, make_example
from motionnft_core.models.demo import DemoSizes, build_demo_flux_kontext
from motionnft_core.models.families import policy_class
from motionnft_core.models.policy import Conditioning, EditPolicy

RECORD_NAME = "warmstart.json"


def warm_start_settings(demo: DemoConfig, model: ModelConfig) -> dict:
    """Everything that determines the warm-started weights (`demo.*` and the text and guidance the policy
    uses): recorded in warmstart.json and hashed into the directory name."""
    settings = {k: v for k, v in asdict(demo).items() if k != "enabled"}
    return {**settings, "max_sequence_length": model.max_sequence_length, "guidance": model.guidance}


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
    demo: DemoConfig,
    stage: str,
    log: list[float],
) -> None:
    """Both stages' loop: AdamW on `loss()` with warm-up + cosine (`lr_factor`), grad clipping, loss log, progress."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=demo.weight_decay)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, demo.warmup)
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, demo.grad_clip)
        opt.step()
        log.append(value.item())
        _progress(stage, step, steps, log)


def fit_vae(policy: EditPolicy, images: torch.Tensor, s: DemoConfig, log: list[float]) -> None:
    """Autoencode `images` (uint8 (N, 3, H, W)) through the policy's VAE; then set its latent normalisation."""
    vae = policy.vae
    g = torch.Generator().manual_seed(s.seed)
    if s.vae_steps > 0:

        def loss() -> torch.Tensor:
            x = _to_unit(images[torch.randint(0, len(images), (s.vae_batch,), generator=g)])
            return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)

        vae.train().requires_grad_(True)
        _optimize(list(vae.parameters()), loss, steps=s.vae_steps, lr=s.vae_lr, demo=s, stage="vae", log=log)
        vae.eval().requires_grad_(False)
    # Latent statistics over the training images: the transformer works on (z - shift) * scale ~ unit scale.
    with torch.no_grad():
        z = torch.cat([vae.encode(_to_unit(images[i : i + 64])).latent_dist.mode() for i in range(0, len(images), 64)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


# ---------------------------------------------------------------------------------------- stage 2: flow matching


def shifted_times(u: torch.Tensor, mu: float) -> torch.Tensor:
    """The schedulers' exponential time shift `e^mu / (e^mu + 1/u - 1)` of uniform u in (0, 1]."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


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


def fit_transformer(policy: EditPolicy, cond: Conditioning, x0: torch.Tensor, s: DemoConfig, log: list[float]) -> None:
    """Rectified flow matching of all transformer weights on (cond, x0) pairs."""
    tr = policy.transformer
    g = torch.Generator().manual_seed(s.seed + 1)
    mu = policy.shift_mu(cond.height, cond.width)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, x0.shape[0], (s.batch,), generator=g)
        noop = torch.rand(s.batch, generator=g) < s.noop_fraction
        x0_b = torch.where(noop[:, None, None], cond.tensors["image_latents"][idx], x0[idx])
        eps = torch.randn(x0_b.shape, generator=g)
        t = shifted_times(torch.rand(s.batch, generator=g).clamp_min(1e-3), mu)
        x_t = (1 - t[:, None, None]) * x0_b + t[:, None, None] * eps
        return F.mse_loss(policy.velocity(x_t, t, cond.select(idx)).float(), eps - x0_b)

    tr.train().requires_grad_(True)
    _optimize(list(tr.parameters()), loss, steps=s.steps, lr=s.lr, demo=s, stage="flow matching", log=log)
    tr.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ entry


def warm_start(
    model_dir: str | os.PathLike, train_set: Sequence, out_dir: str | os.PathLike, demo: DemoConfig, model: ModelConfig
) -> Path:
    """Fit the pipeline at `model_dir` to `train_set` (MotionExamples at the training resolution) with the
    `demo.*` settings, text padded to `model.max_sequence_length`, and save it to `out_dir`; returns `out_dir`.
    An `out_dir` that already holds a finished warm start is returned as is."""
    out_dir = Path(out_dir)
    if _finished(out_dir):
        return out_dir
    if len(train_set) == 0:
        raise ValueError("warm start: the training set is empty")
    torch.manual_seed(demo.seed)
    family = model.family
    policy = EditPolicy.from_pretrained(model_dir, family=family, **policy_class(family).policy_kwargs(model))
    t0 = time.perf_counter()
    vae_log: list[float] = []
    fit_vae(policy, torch.cat([_images(train_set, "input_image"), _images(train_set, "target_image")]), demo, vae_log)
    t_vae = time.perf_counter() - t0
    cond, x0 = encode_pairs(policy, train_set)
    fm_log: list[float] = []
    fit_transformer(policy, cond, x0, demo, fm_log)
    record = {
        "settings": warm_start_settings(demo, model),
        "base": str(model_dir),
        "family": family,
        "n_train": len(train_set),
        "vae_loss": _summary(vae_log),
        "fm_loss": _summary(fm_log),
        "vae_s": round(t_vae, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }

    def write(tmp: Path) -> None:
        policy.pipe.save_pretrained(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1))

    return build_atomically(out_dir, write, complete=_finished, what="warm start")


def _finished(path: Path) -> bool:
    return (path / RECORD_NAME).is_file() and (path / "model_index.json").is_file()


def check_text_length(model: ModelConfig | EditPolicy, model_dir: str | os.PathLike) -> None:
    """Raise if a policy (or the one `model.*` builds) pads its T5 text to another length than the warm start at
    `model_dir` trained with.

    FLUX attends to the padding tokens too, so a transformer fitted on 48-token text sees other inputs at 512
    tokens (the pipeline default): the policy must be built with the recorded `max_sequence_length`.
    """
    record = Path(model_dir) / RECORD_NAME
    if not record.is_file() or not policy_class(model.family).pads_text:
        return  # not a warm-started pipeline, or a family that does not pad its text (Qwen-Image-Edit)
    trained = json.loads(record.read_text())["settings"]["max_sequence_length"]
    if model.max_sequence_length != trained:
        raise ValueError(
            f"{model_dir} was warm-started with max_sequence_length={trained}, but the policy pads text to "
            f"{model.max_sequence_length}; build it with max_sequence_length={trained} (model.max_sequence_length)"
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

def _matches(example, motion: str) -> bool:
    """Whether a synthetic example is of the demo's motion kind (a translation direction, any translation, any)."""
    if motion == "any":
        return True
    if example.motion_rot != 0.0:
        return False
    if motion == "translate":
        return True
    ux, uy = DIRECTIONS[motion]
    return example.motion_dx * ux + example.motion_dy * uy > 0  # the move points the named way


def demo_data(out_dir: str | os.PathLike, n: int, *, size: int, seed: int, motion: str, pan_share: float = 0.0,
              pan_pixels: int = 3) -> Path:  # fmt: skip
    """The first `n` synthetic examples (`motionnft_core.data.synthetic.make_example(seed, i, size)`, i = 0, 1, ...)
    whose motion is `motion`, as a JSONL manifest with PNGs; ids and truth columns as the generator writes them. Reused
    when present. Returns the manifest path. `pan_share` > 0: that share has a camera pan (`data.synthetic_pan_*`),
    recorded in `camera_dx` / `camera_dy`."""
    from PIL import Image

    if motion not in DEMO_MOTIONS:
        raise ValueError(f"demo motion must be one of {DEMO_MOTIONS}, got {motion!r}")
    if n < 1:
        raise ValueError(f"demo examples must be >= 1, got {n}")

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        rows, index = [], 0
        while len(rows) < n:
            ex = make_example(seed, index, size, pan_share=pan_share, pan_pixels=pan_pixels)
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
            if ex.camera_dx or ex.camera_dy:
                rows[-1].update(camera_dx=ex.camera_dx, camera_dy=ex.camera_dy)
        (tmp / JSONL_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    out = build_atomically(out_dir, write, complete=lambda p: (p / JSONL_NAME).is_file(), what="demo data set")
    return out / JSONL_NAME


@dataclass(frozen=True)
class DemoPaths:
    data: Path  # JSONL manifest: data.source of the run
    model: Path  # warm-started pipeline: model.path of the run


def prepare_demo(cfg: Config) -> DemoPaths:
    """Data and warm-started policy of the CPU demo of `cfg` (`demo.*`), built once under
    `<model.cache_dir>/demo/` and reused.

    The data are `demo.examples` synthetic pairs of `demo.motion` at `rollout.height` px (seed `data.seed`). The
    warm start sees only the training side of `MotionEditDataset.split(data.eval_fraction, data.seed)`, the split
    the run itself makes (`motionnft_core.data.motionedit.load_splits`), so the held-out examples stay unseen. The
    warm-started directory's name hashes everything that determines its weights.
    """
    d, size = cfg.demo, cfg.rollout.height
    root = Path(cfg.model.cache_dir).expanduser() / "demo"
    pan = cfg.data.synthetic_pan_share
    panned = f"_pan{pan:g}x{cfg.data.synthetic_pan_pixels}" if pan > 0 else ""  # without: the name it always had
    data = demo_data(root / f"data_{d.motion}_n{d.examples}_s{size}_seed{cfg.data.seed}{panned}", d.examples,
                     size=size, seed=cfg.data.seed, motion=d.motion, pan_share=pan,
                     pan_pixels=cfg.data.synthetic_pan_pixels)  # fmt: skip
    sizes = DemoSizes()
    settings = warm_start_settings(d, cfg.model)
    key = json.dumps({"data": str(data), "eval_fraction": cfg.data.eval_fraction, "split_seed": cfg.data.seed,
                      "model_seed": d.model_seed, "sizes": asdict(sizes), "settings": settings},
                     sort_keys=True)  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    sizes_digest = hashlib.sha256(json.dumps(asdict(sizes), sort_keys=True).encode()).hexdigest()[:8]
    base = build_demo_flux_kontext(root / f"base_seed{d.model_seed}_{sizes_digest}", seed=d.model_seed, sizes=sizes)
    out = root / f"warm_{digest}"
    if not _finished(out):
        dataset = MotionEditDataset.from_source(data, resolution=(size, size), on_error=cfg.data.on_error)
        train, _ = dataset.split(cfg.data.eval_fraction, cfg.data.seed)
        warm_start(base, train, out, d, cfg.model)
    return DemoPaths(data=data, model=out)


def resolve_demo(cfg: Config) -> Config:
    """A run with `demo.enabled`: build (or reuse) the demo data and warm-started pipeline, and return the config
    that trains them: `model.path` and `data.source` filled in, `demo.enabled` false (resolved).

    The resolved config is what a run saves (`<logging.dir>/config.json`), so `evaluation.main heldout --run` loads
    exactly the pipeline and data that were trained. Without `demo.enabled` the config is returned as it is.
    """
    if not cfg.demo.enabled:
        return cfg
    d, m = cfg.demo, cfg.model
    print(f"demo: {d.examples} '{d.motion}' examples at {cfg.rollout.height} px and the warm-started demo "
          f"pipeline under {Path(m.cache_dir).expanduser() / 'demo'} (built on first use, ~2 min; then reused)",
          flush=True)  # fmt: skip
    paths = prepare_demo(cfg)
    print(f"demo: data.source={paths.data} model.path={paths.model}", flush=True)
    return replace(
        cfg,
        model=replace(m, path=str(paths.model)),
        data=replace(cfg.data, source=str(paths.data)),
        demo=replace(d, enabled=False),
    )


def main(argv: list[str] | None = None) -> int:
    """Build the demo of a config ahead of a run (e.g. on a head node) and print the paths it trains."""
    parser = argparse.ArgumentParser(prog="python -m motionnft_core.models.warmstart", description=main.__doc__)
    parser.add_argument("--config", required=True, help="a config with demo.enabled: true (configs/learn_demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.config, args.overrides)
    if not cfg.demo.enabled:
        parser.error(f"demo.enabled: {args.config} does not enable the demo; nothing to build")
    resolved = resolve_demo(cfg)
    print(f"data.source={resolved.data.source}\nmodel.path={resolved.model.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
