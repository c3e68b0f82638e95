"""One editing-policy interface over every model family (docs/architecture.md): this base class and its helpers;
each family's subclass lives in its own module, motionnft_core/models/families/ (the registry names them).

The methods are the pipelines' phases, with the same names for every family:
`encode` (text + input-image latents, once per group) -> `prepare_latents` -> `velocity` (one transformer
forward, the only thing the learner differentiates) -> `decode`; the rollouts' `Sampler` (actors/sampler.py)
chains them with DPM-Solver++(2M). Each phase reuses the pipeline's own components and helper methods
(`encode_prompt`, `_encode_vae_image`, `_pack_latents`, ...); the pipeline's `__call__` is never used, so nothing
is re-encoded per candidate. The policy is shared code: rollouts sample with it, the learner trains it, the
warm start fits it. `load_policy` builds a run's policy from its config (`model.*`, `nft.lora_*`).

Conventions (flow matching, as both pipelines): ``x_t = (1 - s) * x0 + s * eps`` with ``s`` in [0, 1], and
the transformer predicts the velocity ``v = eps - x0``. Latents live in the transformer's packed sequence
layout (B, L, D): L = (H / 16) * (W / 16) tokens of D = 4 * latent channels, because the VAE downsamples 8x
and the pipelines pack 2x2 latent patches; image sizes must therefore be multiples of 16.
"""

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from transformers.utils import logging as transformers_logging

from motionnft_core import s3
from motionnft_core.config import EvalConfig, ModelConfig, NFTConfig
from motionnft_core.guidance import CFG
from motionnft_core.models import fp8
from motionnft_core.models.families import policy_class, policy_classes
from motionnft_core.models.tiny import pipeline_source

LORA_INITS = {"gaussian": "gaussian", "kaiming": True}  # our name -> peft's `init_lora_weights`; B = 0 in both


# ---------------------------------------------------------------------------------------- conditioning
@dataclass
class Conditioning:
    """Everything `velocity` needs besides x_t and sigma; plain tensors, so it pickles through Ray.

    `tensors` are batched along dim 0 (prompt embeddings, their masks, packed input-image latents);
    `shared` are not batched (FLUX's text / image position ids) and are the same for every row;
    `height`, `width` are the pixel size of the edit (and of the input image).
    """

    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    height: int
    width: int

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"Conditioning.tensors must be non-empty with one batch size, got {sizes}")

    @property
    def batch(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def repeat_interleave(self, k: int) -> "Conditioning":
        """Each row repeated k times in place (row i -> rows i*k .. i*k+k-1), as the K candidates of a group."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        tensors = {name: t.repeat_interleave(k, dim=0) for name, t in self.tensors.items()}
        return Conditioning(tensors, dict(self.shared), self.height, self.width)

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> "Conditioning":
        """Rows `index` (a micro-batch of the learner)."""
        if isinstance(index, slice):
            tensors = {name: t[index] for name, t in self.tensors.items()}
        else:
            index = torch.as_tensor(index, dtype=torch.long)
            tensors = {name: t[index.to(t.device)] for name, t in self.tensors.items()}
        return Conditioning(tensors, dict(self.shared), self.height, self.width)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Moved to `device`; floating batched tensors cast to `dtype` (masks and position ids keep theirs)."""
        tensors = {
            name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            for name, t in self.tensors.items()
        }
        shared = {name: t.to(device=device) for name, t in self.shared.items()}
        return Conditioning(tensors, shared, self.height, self.width)

    @staticmethod
    def cat(conds: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch. Text of different lengths is right-padded with zeros along dim 1,
        but only for a tensor `name` that has a mask `name + "_mask"` (the mask pads with 0 = ignored)."""
        if not conds:
            raise ValueError("Conditioning.cat needs at least one Conditioning")
        first = conds[0]
        for i, c in enumerate(conds[1:], start=1):
            if (c.height, c.width) != (first.height, first.width):
                raise ValueError(
                    f"Conditioning.cat: item {i} is {c.height}x{c.width}, item 0 is {first.height}x{first.width}"
                )
            if c.tensors.keys() != first.tensors.keys() or c.shared.keys() != first.shared.keys():
                raise ValueError(f"Conditioning.cat: item {i} has keys {sorted(c.tensors)} / {sorted(c.shared)}")
            for name, t in c.shared.items():
                if not torch.equal(t, first.shared[name]):
                    raise ValueError(f"Conditioning.cat: shared tensor {name!r} of item {i} differs from item 0")
        tensors = {}
        for name in first.tensors:
            parts = [c.tensors[name] for c in conds]
            if len({p.shape[1:] for p in parts}) > 1:
                paddable = name.endswith("_mask") or f"{name}_mask" in first.tensors
                if not paddable or len({(p.ndim, *p.shape[2:]) for p in parts}) > 1:
                    raise ValueError(
                        f"Conditioning.cat: tensor {name!r} has shapes {[tuple(p.shape) for p in parts]}; only "
                        "masked tensors may differ, and only in dim 1"
                    )
                length = max(p.shape[1] for p in parts)
                parts = [_pad_dim1(p, length) for p in parts]
            tensors[name] = torch.cat(parts, dim=0)
        return Conditioning(tensors, dict(first.shared), first.height, first.width)


def _pad_dim1(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of `t` with zeros up to `length`."""
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


# ---------------------------------------------------------------------------------------- loading
def resolve_model_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local pipeline directory for `path` (a local dir, or s3://bucket/prefix downloaded into `cache_dir`)."""
    if s3.is_s3_uri(path):
        if cache_dir is None:
            raise ValueError(f"{path}: an s3:// pipeline needs a cache_dir to download into (model.cache_dir)")
        bucket, key = s3.split_s3_uri(str(path))
        local = s3.download_prefix(str(path), Path(cache_dir).expanduser() / bucket / key.strip("/"))
    else:
        local = Path(path)
    if not (local / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    return local


# ---------------------------------------------------------------------------------------- policy
class EditPolicy:
    """Base class: loading, LoRA, sigma grid, noise, sampling. Subclasses (one per family module): encode,
    velocity, decode, and the family's settings below where the defaults do not fit it."""

    family: str
    pipeline_class: type[DiffusionPipeline]
    config_name: str  # the JSON of its full-size component configs in motionnft_core/models/configs/
    pads_text: bool = False  # pads the instruction to `model.max_sequence_length` tokens (the warm start records it)
    max_input_images: int = 1  # input images an example may have (the first is the motion source)

    # ------------------------------------------------------------------ family settings
    @classmethod
    def policy_kwargs(cls, model: ModelConfig) -> dict:
        """The constructor's settings a run's `model.*` gives this family (none by default)."""
        return {}

    def eval_cfg(self, cfg: EvalConfig) -> CFG | None:
        """The classifier-free guidance of the evaluation edits; None (the default) samples without CFG."""
        return None

    @classmethod
    def eval_sampling(cls, cfg: EvalConfig) -> dict:
        """The `eval.*` guidance settings the family's evaluation edits use, by key: a report shows them and a
        comparison's manifest records them (a resumed comparison must have the same)."""
        return {}

    @contextmanager
    def eval_guidance(self, cfg: EvalConfig) -> Iterator[None]:
        """Inside: the policy's guidance as the evaluation samples (rollouts and training keep `model.*`'s)."""
        yield

    @classmethod
    def stock_call_kwargs(cls, height: int, width: int) -> dict:
        """Arguments of the stock pipeline's `__call__` that make it sample as the rollouts do (no CFG, the edit at
        `height` x `width`): the parity-with-the-pipeline tests and the benchmark's naive loop use them."""
        return {}

    def lora_target_modules(self, requested: Sequence[str]) -> list[str]:
        """peft's `target_modules` for the requested names (`nft.lora_targets`): where a block type names its layers
        otherwise, the family maps them (the default: the names as given)."""
        return list(requested)

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.vae_scale_factor: int = pipe.vae_scale_factor
        self.latent_channels: int = self.transformer.config.in_channels // 4  # before 2x2 packing

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        family: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike | None = None,
        **policy_kwargs,
    ) -> "EditPolicy":
        """Load a saved pipeline (local dir or s3://bucket/prefix) of `family` as a frozen policy.

        `policy_kwargs` go to the family's constructor (e.g. `guidance_scale` for Kontext).
        """
        policy_cls = policy_class(family)  # ValueError naming the families for an unknown one
        if cls is not EditPolicy and cls is not policy_cls:
            raise ValueError(f"{cls.__name__}.from_pretrained cannot load family {family!r}")
        local = resolve_model_path(path, cache_dir)
        saved_class = json.loads((local / "model_index.json").read_text()).get("_class_name")
        if saved_class != policy_cls.pipeline_class.__name__:
            raise ValueError(
                f"{path} holds a {saved_class}, but family {family!r} needs a {policy_cls.pipeline_class.__name__}"
            )
        pipe = policy_cls.pipeline_class.from_pretrained(local, dtype=dtype)
        return cls.from_pipe(policy_cls.place(pipe, device, **policy_kwargs), **policy_kwargs)

    @classmethod
    def place(cls, pipe: DiffusionPipeline, device: torch.device | str, **policy_kwargs) -> DiffusionPipeline:
        """Move the loaded pipeline to `device` (a family that keeps a component elsewhere says so here)."""
        return pipe.to(device)

    @classmethod
    def from_pipe(cls, pipe: DiffusionPipeline, **policy_kwargs) -> "EditPolicy":
        """A frozen policy over a pipeline already in memory (e.g. motionnft_core.models.full_size's random full-size
        one); its family follows from the pipeline class."""
        policies = policy_classes()
        by_class = {p.pipeline_class: p for p in policies.values()}
        if type(pipe) not in by_class:
            raise ValueError(f"no policy for a {type(pipe).__name__}; expected one of {sorted(policies)}")
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()  # base weights are frozen; only LoRA trains
        return by_class[type(pipe)](pipe, **policy_kwargs)

    # ------------------------------------------------------------------ LoRA (peft through diffusers)
    def add_lora(
        self,
        *,
        rank: int,
        alpha: int,
        target_modules: Sequence[str],
        adapter_name: str = "default",
        init: str = "gaussian",
    ) -> None:
        """Add a LoRA adapter to the transformer and make it the active one.

        Both inits (peft's "gaussian": A ~ N(0, 1/rank); "kaiming": peft's default) set B = 0, so a fresh
        adapter leaves the output unchanged.
        """
        if init not in LORA_INITS:
            raise ValueError(f"init must be one of {sorted(LORA_INITS)}, got {init!r}")
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=self.lora_target_modules(target_modules),
            init_lora_weights=LORA_INITS[init],
        )
        self.transformer.add_adapter(config, adapter_name=adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter (e.g. "old" for the sampling policy); peft also makes its
        parameters, and only those, require grad."""
        self.transformer.set_adapter(adapter_name)

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model (reference forwards, v_ref): all adapters off inside the block."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def _lora_parameters(self, adapter_name: str) -> dict[str, torch.nn.Parameter]:
        """The adapter's parameters keyed as peft's `get_peft_model_state_dict` (adapter name removed)."""
        params = {}
        for name, param in self.transformer.named_parameters():
            for kind in ("lora_A", "lora_B"):
                marker = f".{kind}.{adapter_name}."
                if marker in name:
                    params[name.replace(marker, f".{kind}.")] = param
        if not params:
            raise ValueError(f"the transformer has no LoRA adapter named {adapter_name!r}")
        return params

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Detached copies of the adapter's weights, names without the adapter name
        (`transformer_blocks.0.attn.to_q.lora_A.weight`)."""
        return {name: p.detach().clone() for name, p in self._lora_parameters(adapter_name).items()}

    @torch.no_grad()
    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
        """Copy `state_dict` into the adapter in place (cast to its dtype/device).

        Everything is checked first: a missing or unexpected key or a shape mismatch raises ValueError
        naming the first offender, and then no weight has changed.
        """
        params = self._lora_parameters(adapter_name)
        missing = sorted(params.keys() - state_dict.keys())
        if missing:
            raise ValueError(f"LoRA state dict for adapter {adapter_name!r} misses key {missing[0]!r}")
        unexpected = sorted(state_dict.keys() - params.keys())
        if unexpected:
            raise ValueError(f"LoRA state dict for adapter {adapter_name!r} has unexpected key {unexpected[0]!r}")
        for name, param in params.items():
            if tuple(state_dict[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"LoRA state dict key {name!r} has shape {tuple(state_dict[name].shape)}, "
                    f"adapter {adapter_name!r} expects {tuple(param.shape)}"
                )
        for name, param in params.items():
            param.copy_(state_dict[name])

    def compile_blocks(self) -> None:
        """Regional compilation (`rollout.compile`, `learner.compile`): `torch.compile` of every repeated
        transformer block's forward, the blocks diffusers lists in `_repeated_blocks`. Compiling the forward, not
        the module, keeps module hooks outside the compiled region, so FSDP2-sharded blocks (whose class FSDP
        renames) compile too; adapter switches (θ, old, off) each get their own graph. Idempotent."""
        for block in self.repeated_blocks():
            if not getattr(block, "_motionnft_compiled", False):
                block.forward = torch.compile(block.forward)
                block._motionnft_compiled = True

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The transformer's repeated blocks (diffusers' `_repeated_blocks`): where nearly all its FLOPs are."""
        names = set(getattr(self.transformer, "_repeated_blocks", ()))
        blocks = [m for m in self.transformer.modules() if any(k.__name__ in names for k in type(m).__mro__)]
        if not blocks:
            raise ValueError(f"{type(self.transformer).__name__} lists no repeated blocks")
        return blocks

    def use_fp8(self) -> int:
        """Give the repeated blocks' linear layers a float8 copy for no-grad forwards (`rollout.fp8`,
        motionnft_core/models/fp8.py; off until `fp8.fp8_forwards` turns it on); returns how many layers have one.
        Idempotent."""
        fp8.check_fp8_device(self.device)
        if self.device.type == "cuda" and self.dtype != torch.bfloat16:
            raise ValueError(f"rollout.fp8 on CUDA needs model.dtype bfloat16 (row-wise FP8 products): {self.dtype}")
        return fp8.convert(self.repeated_blocks())

    # ------------------------------------------------------------------ shapes and grids
    def check_size(self, height: int, width: int) -> None:
        """Raise unless the size packs into whole 2x2 latent patches (a multiple of 16 for 8x VAEs)."""
        multiple = self.vae_scale_factor * 2
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image height and width must be positive multiples of {multiple}, got {height}x{width}")

    def seq_len(self, height: int, width: int) -> int:
        """Number of packed latent tokens of an edit of this pixel size."""
        self.check_size(height, width)
        multiple = self.vae_scale_factor * 2
        return (height // multiple) * (width // multiple)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the VAE latent of an edit of this pixel size, before the 2x2 packing."""
        self.check_size(height, width)
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def pack_map(self, latent_map: torch.Tensor) -> torch.Tensor:
        """A per-latent-pixel map (h, w) in the packed token order (L,), by the pipeline's own `_pack_latents`
        (one channel; each token is the mean of its 2x2 patch): the motion-focal weights land on the tokens whose
        pixels they describe."""
        h, w = latent_map.shape
        packed = self.pipe._pack_latents(latent_map.reshape(1, 1, h, w), 1, 1, h, w)  # (1, L, 4)
        return packed[0].mean(dim=-1)

    def shift_mu(self, height: int, width: int) -> float:
        """mu of the scheduler's dynamic shift for an edit of this size (`calculate_shift` of the image sequence
        length, with the scheduler config's bounds); the warm start draws its training times with it too."""
        config = self.pipe.scheduler.config
        return calculate_shift(
            self.seq_len(height, width),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The model's own shifted grid, float32 (num_steps,) on the CPU, exactly as its pipeline builds it:
        ``linspace(1, 1/num_steps, num_steps)``, then the scheduler's dynamic shift for the image sequence
        length (`shift_mu`), then any `shift_terminal` stretch (Qwen-Image ends at 0.02)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps == 1:
            # Every shift maps sigma 1 to 1; the terminal stretch would divide 0 by 0 (the pipeline gets NaN).
            self.check_size(height, width)
            return torch.ones(1, dtype=torch.float32)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)  # the pipeline's stays
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=self.shift_mu(height, width))
        return scheduler.sigmas[:-1].to(device="cpu", dtype=torch.float32)

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator | list[torch.Generator]
    ) -> torch.Tensor:
        """Packed float32 Gaussian noise (batch, L, D) drawn as the pipeline draws it (one generator, or one
        per row). Float32 whatever the model dtype, so a seed gives the same noise on every machine."""
        self.check_size(height, width)
        latents = self.pipe.prepare_latents(
            None, batch, self.latent_channels, height, width, torch.float32, self.device, generator
        )[0]
        return latents

    def _input_slots(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The input images as one (B, 3, H, W) tensor per input-image slot, in their order (the first is the motion
        source); a single tensor is one slot. Raises for more slots than the family takes or slots of other shapes."""
        slots = [images] if isinstance(images, torch.Tensor) else list(images)
        if not 1 <= len(slots) <= self.max_input_images:
            raise ValueError(
                f"{self.family} takes 1 to {self.max_input_images} input images per example, got {len(slots)}"
            )
        shapes = [tuple(s.shape) for s in slots]
        if len(set(shapes)) > 1:
            raise ValueError(f"the input images of a batch must have one shape, got {shapes}")
        return slots

    def _check_images(self, prompts: Sequence[str], images: torch.Tensor) -> tuple[int, int, int]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        batch, _, height, width = images.shape
        self.check_size(height, width)
        return batch, height, width

    def _check_velocity_inputs(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Validate shapes; return sigma as (B,) on the model's device and dtype."""
        expected = (cond.batch, self.seq_len(cond.height, cond.width), self.transformer.config.in_channels)
        if tuple(x_t.shape) != expected:
            raise ValueError(
                f"x_t has shape {tuple(x_t.shape)}; the conditioning ({cond.batch} rows, {cond.height}x{cond.width}) "
                f"needs {expected}"
            )
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(cond.batch)
        if tuple(sigma.shape) != (cond.batch,):
            raise ValueError(f"sigma must be a scalar or shape ({cond.batch},), got {tuple(sigma.shape)}")
        return sigma.to(device=self.device, dtype=self.dtype)

    def _to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> the VAE's [-1, 1] range, in the VAE's dtype."""
        return images.to(device=self.device, dtype=self.vae.dtype) / 127.5 - 1.0

    @staticmethod
    def _to_uint8(images: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1] -> uint8, rounded as diffusers' `numpy_to_pil` does."""
        return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    # ------------------------------------------------------------------ phases (per family)
    def encode(self, prompts: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]) -> Conditioning:
        """Text and input-image conditioning for `prompts` and uint8 `images` (B, 3, H, W), or a sequence of such
        tensors, one per input image in order, where the family takes several (`max_input_images`)."""
        raise NotImplementedError

    def velocity(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v = eps - x0 predicted at x_t (B, L, D), noise level sigma (B,) in [0, 1]; differentiable. Every family's
        pipeline makes it the same way: one transformer call over the target's tokens followed by the input images'
        (`image_latents`), of which the target's are kept; the call's other arguments are the family's
        (`transformer_inputs`)."""
        sigma = self._check_velocity_inputs(x_t, sigma, cond)
        c = cond.to(self.device, self.dtype)
        seq_len = x_t.shape[1]
        hidden_states = torch.cat([x_t.to(self.device, self.dtype), c.tensors["image_latents"]], dim=1)
        out = self.transformer(
            hidden_states=hidden_states,
            timestep=sigma,  # the pipelines pass timesteps / 1000 = sigma
            **self.transformer_inputs(c, seq_len),
            return_dict=False,
        )[0]
        return out[:, :seq_len].to(x_t.dtype)  # the target tokens; the input images' are dropped

    def transformer_inputs(self, cond: Conditioning, seq_len: int) -> dict:
        """The transformer's arguments besides the tokens and the timestep (text, positions, guidance), from `cond`
        on the model's device and dtype, for targets of `seq_len` tokens."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed clean latents (B, L, D) -> uint8 images (B, 3, H, W)."""
        raise NotImplementedError


def load_policy(
    model: ModelConfig, path: str | None = None, *, use_gpu: bool, lora: NFTConfig | None = None
) -> EditPolicy:
    """A run's policy: the pipeline at `path` as `model.*` says; with `lora`, an empty adapter of rank
    `lora.lora_rank` on `lora.lora_targets` (rollouts load published weights into it).

    Actors receive this function with its arguments bound (`functools.partial`) and call it in their own
    process, so no model ever travels through the driver. Without `path`, `model` is resolved here, on the
    actor's node (`model.path`, or the tiny pipeline built into this node's `model.cache_dir`): the driver's
    disk is not the actor's on a cluster."""
    # Every actor loads its own copy: their progress bars would interleave on one console (and say nothing new).
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if path is None:
        path = pipeline_source(model)
    policy = EditPolicy.from_pretrained(
        path,
        family=model.family,
        dtype=getattr(torch, model.dtype),
        device="cuda" if use_gpu else "cpu",
        cache_dir=str(Path(model.cache_dir).expanduser() / "models"),
        **policy_class(model.family).policy_kwargs(model),
    )
    if lora is not None:
        policy.add_lora(rank=lora.lora_rank, alpha=lora.lora_alpha, target_modules=list(lora.lora_targets))
    return policy


def __getattr__(name: str) -> type:
    """The family classes by their old names here (`from motionnft_core.models.policy import FluxKontextPolicy`)."""
    by_name = {cls.__name__: cls for cls in policy_classes().values()}
    if name in by_name:
        return by_name[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
