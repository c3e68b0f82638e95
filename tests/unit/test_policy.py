"""EditPolicy over both tiny pipelines: loading, encode/sample/velocity/decode, sigma grids, LoRA plumbing.

The tiny pipelines are built once per session with motionnft_core/models/tiny.py and loaded through the same
`from_pretrained` path as real checkpoints. S3 loading is tested with the other S3 paths, not here.
"""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from PIL import Image

from motionnft_core.models.policy import Conditioning, EditPolicy, FluxKontextPolicy, QwenImageEditPolicy
from motionnft_core.models.tiny import build_tiny

FAMILIES = ["flux_kontext", "qwen_image_edit", "qwen_image_edit_plus", "flux2_klein", "flux2_dev"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
H, W = 64, 48  # non-square, so a swapped height/width cannot pass
TOKENS = (H // 16) * (W // 16)  # packed latent tokens: 8x VAE, 2x2 packing
PROMPT = "make the person raise both arms"


@pytest.fixture(scope="module")
def tiny_dirs(tiny_pipelines) -> dict[str, Path]:
    """Both tiny pipelines (conftest builds them once per session with build_tiny)."""
    return tiny_pipelines


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request, tiny_dirs) -> EditPolicy:
    """A read-only policy per family (tests that add adapters load their own); short T5 text for speed."""
    kwargs = {"max_sequence_length": 64} if request.param == "flux_kontext" else {}
    return EditPolicy.from_pretrained(str(tiny_dirs[request.param]), family=request.param, **kwargs)


def _images(batch: int, seed: int, height: int = H, width: int = W) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- building / loading
def test_build_is_small_idempotent_and_rejects_bad_family(tiny_dirs, tmp_path):
    for family, path in tiny_dirs.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert size < 20e6, f"{family} tiny pipeline is {size / 1e6:.1f} MB"
        stamp = (path / "model_index.json").stat().st_mtime_ns
        assert build_tiny(family, path) == path  # second build returns the existing one untouched
        assert (path / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="'flux_dev'"):
        build_tiny("flux_dev", tmp_path / "x")


def test_from_pretrained_dispatches_and_checks_family(tiny_dirs, tmp_path):
    assert isinstance(EditPolicy.from_pretrained(tiny_dirs["flux_kontext"], family="flux_kontext"), FluxKontextPolicy)
    assert isinstance(
        QwenImageEditPolicy.from_pretrained(tiny_dirs["qwen_image_edit"], family="qwen_image_edit"),
        QwenImageEditPolicy,
    )
    with pytest.raises(ValueError, match="QwenImageEditPipeline"):
        EditPolicy.from_pretrained(tiny_dirs["qwen_image_edit"], family="flux_kontext")
    with pytest.raises(ValueError, match="'sdxl'"):
        EditPolicy.from_pretrained(tiny_dirs["flux_kontext"], family="sdxl")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        EditPolicy.from_pretrained(tmp_path, family="flux_kontext")


def test_velocity_shape_determinism_and_input_checks(policy):
    cond = policy.encode([PROMPT, "turn the car so that it faces left"], _images(2, seed=1))
    x_t = policy.prepare_latents(2, H, W, _gen(0))
    sigma = torch.tensor([0.9, 0.4])
    v = policy.velocity(x_t, sigma, cond)
    assert v.shape == x_t.shape and v.dtype == torch.float32
    assert torch.equal(v, policy.velocity(x_t, sigma, cond))
    # Rows are independent: row 0 alone gives what it gave in the batch ...
    assert (policy.velocity(x_t[:1], sigma[:1], cond.select([0])) - v[:1]).abs().max() < 1e-5
    # ... and its conditioning matters: the same x_t and sigma under row 1's prompt and image differ.
    assert (policy.velocity(x_t[:1], sigma[:1], cond.select([1])) - v[:1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="x_t has shape"):
        policy.velocity(x_t[:, :-1], sigma, cond)
    with pytest.raises(ValueError, match="sigma must be"):
        policy.velocity(x_t, torch.ones(3), cond)


def test_velocity_is_differentiable_through_lora(tiny_dirs):
    policy = EditPolicy.from_pretrained(tiny_dirs["qwen_image_edit"], family="qwen_image_edit")
    policy.add_lora(rank=2, alpha=4, target_modules=["to_q", "to_v"])
    cond = policy.encode([PROMPT], _images(1, seed=0))
    v = policy.velocity(policy.prepare_latents(1, H, W, _gen(0)), torch.tensor([0.5]), cond)
    v.square().mean().backward()
    grads = {n: p.grad for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads), "only LoRA parameters may be trainable"
    assert all(g is not None for g in grads.values())
    # B = 0 at init, so A's gradient is exactly 0 and B's is not.
    assert all(g.abs().max() == 0 for n, g in grads.items() if "lora_A" in n)
    assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_B" in n)


def _stop_after_first_step(pipe, step, timestep, callback_kwargs):
    pipe._interrupt = True  # the pipeline skips the remaining steps and returns the latents as they are
    return {}


@pytest.mark.parametrize(
    "family, size",
    [
        ("flux_kontext", 64),
        # Qwen's pipeline resizes the input image to ~1 MP; at 1024^2 that resize is the identity.
        pytest.param("qwen_image_edit", 1024, marks=pytest.mark.slow),
        # The Plus pipeline's ~1 MP is a module constant, set to the edit's area here (tests/unit/test_families.py
        # checks it with two input images).
        ("qwen_image_edit_plus", 64),
    ],
)
def test_velocity_matches_the_pipeline(tiny_dirs, family, size, monkeypatch):
    """The first Euler step of the pipeline's own __call__ (its encoders, latents, ids / img_shapes, guidance,
    timestep scaling) equals ``noise + (sigma_1 - 1) * velocity(noise, 1)`` of the policy."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", size * size)
    policy = EditPolicy.from_pretrained(tiny_dirs[family], family=family)
    images = _images(1, seed=5, height=size, width=size)
    cond = policy.encode([PROMPT], images)
    noise = policy.prepare_latents(1, size, size, _gen(3))
    grid = policy.sigmas(2, size, size)
    x1 = noise + (grid[1] - grid[0]) * policy.velocity(noise, grid[:1], cond)

    kwargs = dict(height=size, width=size, num_inference_steps=2, latents=noise, output_type="latent")
    kwargs.update(policy.stock_call_kwargs(size, size))
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    reference = policy.pipe(pil, PROMPT, callback_on_step_end=_stop_after_first_step, **kwargs).images
    torch.testing.assert_close(x1, reference, atol=1e-5, rtol=1e-5)


def test_decode_is_inverse_of_encode_layout(policy):
    """decode(packed image latents) goes through the same VAE scaling as encode: with a random tiny VAE the
    round trip is not the identity, but it must be exactly the VAE's own decode(encode) path."""
    images = _images(2, seed=4)
    cond = policy.encode(["a", "b"], images)
    decoded = policy.decode(cond.tensors["image_latents"], H, W)
    assert decoded.shape == images.shape and decoded.dtype == torch.uint8
    vae = policy.vae
    pixels = images.float() / 127.5 - 1
    if isinstance(policy, QwenImageEditPolicy):
        expected = vae.decode(vae.encode(pixels.unsqueeze(2)).latent_dist.mode()).sample[:, :, 0]
    else:
        expected = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    expected = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    assert (decoded.int() - expected.int()).abs().max() <= 1  # rounding of values at .5


# ---------------------------------------------------------------------------------------- sigma grid
def _expected_sigmas(family: str, n: int, height: int, width: int) -> list[float]:
    """The grid written out by hand from the real scheduler configs (docs/architecture.md) and FLUX.2's mu."""
    seq = (height // 16) * (width // 16)
    if family == "flux_kontext":
        base_len, max_len, base_shift, max_shift, terminal = 256, 4096, 0.5, 1.15, None
    else:
        base_len, max_len, base_shift, max_shift, terminal = 256, 8192, 0.5, 0.9, 0.02
    mu = base_shift + (max_shift - base_shift) / (max_len - base_len) * (seq - base_len)
    if family.startswith("flux2"):  # FLUX.2's empirical mu of (tokens, steps): linear in both, no terminal stretch
        m200, m10 = 0.00016927 * seq + 0.45666666, 8.73809524e-05 * seq + 1.89833333
        mu = m200 + (m200 - m10) / 190.0 * (n - 200) if seq <= 4300 else m200
        terminal = None
    raw = np.linspace(1.0, 1.0 / n, n)
    shifted = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in raw]
    if terminal is not None:
        scale = (1 - shifted[-1]) / (1 - terminal)
        shifted = [1 - (1 - s) / scale for s in shifted]
    return shifted


@pytest.mark.parametrize("n, height, width", [(6, 512, 512), (3, 64, 48), (4, 1024, 768)])
def test_sigmas_follow_the_shifted_grid(policy, n, height, width):
    sigmas = policy.sigmas(n, height, width)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n,)
    expected = torch.tensor(_expected_sigmas(policy.family, n, height, width), dtype=torch.float32)
    torch.testing.assert_close(sigmas, expected, atol=1e-6, rtol=0)
    assert sigmas[0] == 1.0 and (sigmas[1:] < sigmas[:-1]).all()
    if policy.family == "qwen_image_edit":
        assert abs(sigmas[-1].item() - 0.02) < 1e-6  # shift_terminal
    assert torch.equal(policy.sigmas(1, height, width), torch.ones(1))


def test_bad_image_size_raises(policy):
    with pytest.raises(ValueError, match="multiples of 16"):
        policy.encode([PROMPT], _images(1, seed=0, height=60, width=48))
    with pytest.raises(ValueError, match="multiples of 16"):
        policy.prepare_latents(1, 72, 64, _gen(0))
    with pytest.raises(ValueError, match="multiples of 16"):
        policy.sigmas(3, 64, 40)
    with pytest.raises(ValueError, match="uint8"):
        policy.encode([PROMPT], _images(1, seed=0).float())
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        policy.encode([PROMPT, PROMPT], _images(1, seed=0))


# ---------------------------------------------------------------------------------------- conditioning
def test_cat_of_separately_encoded_prompts_matches_each_alone(policy):
    """Qwen's text lengths differ per prompt: cat pads embeddings and mask, and the masked batch gives the
    same velocities as each prompt alone (unpadded, unmasked)."""
    short = policy.encode(["smile"], _images(1, seed=2))
    long = policy.encode([PROMPT + " and turn the head to the left side of the frame"], _images(1, seed=3))
    both = Conditioning.cat([short, long]).to("cpu", torch.float32)
    if policy.family == "qwen_image_edit":
        len_short, len_long = short.tensors["prompt_embeds"].shape[1], long.tensors["prompt_embeds"].shape[1]
        assert len_short < len_long and both.tensors["prompt_embeds"].shape[1] == len_long
        assert both.tensors["prompt_embeds_mask"].sum(dim=1).tolist() == [len_short, len_long]
        assert both.tensors["prompt_embeds"][0, len_short:].abs().max() == 0
    x_t = policy.prepare_latents(2, H, W, _gen(0))
    sigma = torch.tensor([0.8, 0.3])
    v = policy.velocity(x_t, sigma, both)
    for i, single in enumerate([short, long]):
        torch.testing.assert_close(
            v[i : i + 1], policy.velocity(x_t[i : i + 1], sigma[i : i + 1], single), atol=1e-5, rtol=1e-5
        )

    group = both.repeat_interleave(3)
    assert group.batch == 6 and torch.equal(group.tensors["image_latents"][3], both.tensors["image_latents"][1])
    restored = pickle.loads(pickle.dumps(both))  # travels through Ray's object store
    assert all(torch.equal(restored.tensors[k], t) for k, t in both.tensors.items())
    assert (restored.height, restored.width) == (H, W)


def test_conditioning_cat_rules():
    def cond(text_len: int, height: int = H) -> Conditioning:
        return Conditioning(
            tensors={
                "prompt_embeds": torch.ones(1, text_len, 4),
                "prompt_embeds_mask": torch.ones(1, text_len, dtype=torch.long),
                "image_latents": torch.ones(1, 12, 16),
            },
            shared={"ids": torch.arange(3)},
            height=height,
            width=W,
        )

    merged = Conditioning.cat([cond(2), cond(5)])
    assert merged.tensors["prompt_embeds"].shape == (2, 5, 4)
    assert merged.tensors["prompt_embeds_mask"].tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    assert merged.to(dtype=torch.bfloat16).tensors["prompt_embeds_mask"].dtype == torch.long

    with pytest.raises(ValueError, match="item 1 is 32x48"):
        Conditioning.cat([cond(2), cond(2, height=32)])
    unmasked = cond(3)
    unmasked.tensors["image_latents"] = torch.ones(1, 20, 16)
    with pytest.raises(ValueError, match="'image_latents'"):
        Conditioning.cat([cond(3), unmasked])
    other_ids = cond(2)
    other_ids.shared["ids"] = torch.arange(1, 4)
    with pytest.raises(ValueError, match="shared tensor 'ids'"):
        Conditioning.cat([cond(2), other_ids])
    with pytest.raises(ValueError, match="one batch size"):
        Conditioning({"a": torch.ones(1, 2), "b": torch.ones(2, 2)}, {}, H, W)


# ---------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_state_dict_round_trip_and_adapter_switching(tiny_dirs, family):
    policy = EditPolicy.from_pretrained(tiny_dirs[family], family=family)
    cond = policy.encode([PROMPT], _images(1, seed=0))
    x_t = policy.prepare_latents(1, H, W, _gen(0))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        v_base = policy.velocity(x_t, sigma, cond)

        policy.add_lora(rank=4, alpha=8, target_modules=LORA_TARGETS)
        # Gaussian init draws A ~ N(0, 1/r) but sets B = 0: a fresh adapter is the identity.
        torch.testing.assert_close(policy.velocity(x_t, sigma, cond), v_base, atol=1e-6, rtol=0)

        sd = policy.lora_state_dict()
        peft_sd = get_peft_model_state_dict(policy.transformer, adapter_name="default")
        assert sd.keys() == peft_sd.keys() and all(sd[k].shape == peft_sd[k].shape for k in sd)
        assert all(".default." not in k for k in sd)
        assert any(k.endswith("to_q.lora_A.weight") for k in sd) and all(
            v.shape[0] == 4 for k, v in sd.items() if "lora_A" in k
        )

        g = _gen(11)
        trained = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in sd.items()}
        policy.load_lora_state_dict(trained)
        v_lora = policy.velocity(x_t, sigma, cond)
        assert (v_lora - v_base).abs().max() > 1e-3
        assert all(torch.equal(policy.lora_state_dict()[k], trained[k]) for k in trained)
        with policy.adapters_disabled():
            torch.testing.assert_close(policy.velocity(x_t, sigma, cond), v_base, atol=1e-6, rtol=0)
        assert torch.equal(policy.velocity(x_t, sigma, cond), v_lora)  # re-enabled after the block

        # A second adapter ("old") switches independently of "default".
        policy.add_lora(rank=4, alpha=8, target_modules=LORA_TARGETS, adapter_name="old")
        torch.testing.assert_close(policy.velocity(x_t, sigma, cond), v_base, atol=1e-6, rtol=0)  # old: B = 0
        policy.set_adapter("default")
        torch.testing.assert_close(policy.velocity(x_t, sigma, cond), v_lora, atol=1e-6, rtol=0)

        # The same weights in a freshly loaded policy give the same velocity.
        other = EditPolicy.from_pretrained(tiny_dirs[family], family=family)
        other.add_lora(rank=4, alpha=8, target_modules=LORA_TARGETS)
        other.load_lora_state_dict(policy.lora_state_dict())
        torch.testing.assert_close(other.velocity(x_t, sigma, cond), v_lora, atol=1e-6, rtol=0)

        # Zeroed B brings back the base model.
        zero_b = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in trained.items()}
        other.load_lora_state_dict(zero_b)
        torch.testing.assert_close(other.velocity(x_t, sigma, cond), v_base, atol=1e-6, rtol=0)


def test_load_lora_state_dict_rejects_bad_input_and_changes_nothing(tiny_dirs):
    policy = EditPolicy.from_pretrained(tiny_dirs["flux_kontext"], family="flux_kontext")
    policy.add_lora(rank=4, alpha=8, target_modules=LORA_TARGETS)
    before = policy.lora_state_dict()
    g = _gen(5)
    fresh = {k: torch.randn(v.shape, generator=g) for k, v in before.items()}  # every value differs
    last = sorted(fresh)[-1]  # checked last: a copy-as-you-go loader would already have written the rest

    bad_shape = dict(fresh)
    bad_shape[last] = torch.zeros(before[last].shape[0] + 1, *before[last].shape[1:])
    missing = {k: v for k, v in fresh.items() if k != last}
    unexpected = {**fresh, "transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 32)}
    for bad, match in [
        (bad_shape, f"{last!r} has shape"),
        (missing, f"misses key {last!r}"),
        (unexpected, "unexpected key"),
    ]:
        with pytest.raises(ValueError, match=match.replace("[", r"\[").replace(".", r"\.")):
            policy.load_lora_state_dict(bad)
        after = policy.lora_state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), "a rejected state dict changed weights"

    with pytest.raises(ValueError, match="no LoRA adapter named 'old'"):
        policy.lora_state_dict("old")
    with pytest.raises(ValueError, match="init must be one of"):
        policy.add_lora(rank=4, alpha=8, target_modules=LORA_TARGETS, adapter_name="x", init="pissa")
