"""Synthetic motion-edit data: a textured coloured shape that moves or rotates over a textured background.

Why: tests, CPU runs and benchmarks need MotionEdit-shaped triplets (input, instruction, target) whose true
motion is known exactly, without any download. Each example is one shape (square, disc or triangle) in a
saturated colour, carrying its own smooth brightness texture, on a smooth, low-saturation random background
texture (so an optical-flow estimator has something to track everywhere). The instruction asks for one motion:

- translation by an integer number of pixels, e.g. "move the red square 8 pixels to the right"
  (category ``Locomotion/Distance``);
- rotation about the shape's centre by a whole number of degrees, e.g. "rotate the blue triangle 30 degrees
  clockwise" (category ``Orientation/Viewpoint``; squares and triangles only, a disc looks the same rotated).

The target is rendered from the same background with the moved shape: the shape is the only thing that
changes. Shapes are drawn 4x supersampled and box-filtered down, then pasted at integer pixel positions, so
a translation moves every object pixel by exactly ``(dx, dy)``.

Extra columns record the truth: ``motion_dx`` / ``motion_dy`` (pixels, +x right, +y down), ``motion_rot``
(degrees, positive = counter-clockwise on screen), plus ``object_shape``, ``object_color`` and the input
centre ``object_x`` / ``object_y`` (pixels; the centre of the pixel grid, as float). Everything is
numpy + PIL and deterministic for a seed; example ``i`` depends only on ``(seed, i, size)``, not on ``n``.

Camera pan (`data.synthetic_pan_share`, off by default): a share of examples, drawn from a generator of its own
(so every other example and every other draw stay bit for bit what they are without it), has its whole target
frame shifted by ``pan_pixels`` along one axis, on top of the object's motion: what a camera that moved between
the two shots adds. The border the shift reveals repeats the edge pixels. Such an example records its shift in
``camera_dx`` / ``camera_dy`` (pixels); the others have no such fields.

CLI: ``python -m motionnft_core.data.synthetic --out DIR --n N --size S [--seed 0] [--fmt parquet|jsonl]
[--reference]``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from motionnft_core.config import DataConfig

COLORS = {  # saturated, so max(rgb) - min(rgb) >= 120 even at the darkest texture value
    "red": (225, 35, 35),
    "green": (35, 200, 55),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "magenta": (220, 40, 210),
    "cyan": (30, 205, 225),
}
SHAPES = ("square", "disc", "triangle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
ROTATION_DEGREES = (20, 30)  # avoid 45/60/90/120: symmetric shapes would look unchanged or ambiguous
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down for smooth, exactly shiftable edges
CATEGORY_TRANSLATE = "Locomotion/Distance"
CATEGORY_ROTATE = "Orientation/Viewpoint"
PARQUET_NAME = "synthetic.parquet"
JSONL_NAME = "metadata.jsonl"


@dataclass(frozen=True)
class SyntheticExample:
    id: str
    prompt: str
    category: str
    input_image: np.ndarray  # (H, W, 3) uint8
    target_image: np.ndarray  # (H, W, 3) uint8
    motion_dx: int
    motion_dy: int
    motion_rot: float
    object_shape: str
    object_color: str
    object_x: float
    object_y: float
    reference_image: np.ndarray | None = None  # (H, W, 3) uint8: a second input image, when asked for
    camera_dx: int = 0  # the camera pan added to the target frame (pixels), 0 without one
    camera_dy: int = 0


def pan_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(H, W, 3) content shifted by (dx, dy) pixels (+x right, +y down), the revealed border repeating the edge."""
    h, w = image.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        raise ValueError(f"pan ({dx}, {dy}) does not fit a {w}x{h} image")
    padded = np.pad(image, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    top, left = abs(dy) - dy, abs(dx) - dx
    return np.ascontiguousarray(padded[top : top + h, left : left + w])


def camera_pan(seed: int, index: int, size: int, *, share: float, pixels: int) -> tuple[int, int]:
    """(dx, dy) of example `index`'s camera pan: (0, 0) for all but a `share` of examples, else `pixels` along one
    of the four axis directions; its own generator, so the example's other draws do not move."""
    if share <= 0:
        return 0, 0
    rng = np.random.default_rng([seed, index, size, 0x9A4])
    if rng.random() >= share:
        return 0, 0
    ux, uy = list(DIRECTIONS.values())[rng.integers(len(DIRECTIONS))]
    return pixels * ux, pixels * uy


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float noise in [0, 1]: a random cells x cells grid upsampled bicubically."""
    grid = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation smooth texture in [60, 190]: two octaves of grey noise plus a faint per-channel tint."""
    grey = 0.65 * _smooth_noise(rng, size, max(3, size // 10)) + 0.35 * _smooth_noise(rng, size, max(5, size // 5))
    base = 60.0 + 120.0 * grey
    tint = np.stack([_smooth_noise(rng, size, 3) for _ in range(3)], axis=-1) - 0.5  # each channel +-0.5
    rgb = base[..., None] + 20.0 * tint
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _sprite(rng: np.random.Generator, shape: str, color: str, radius: int, rotation: float) -> Image.Image:
    """RGBA sprite of side 2*radius+4 with the shape centred on the sprite centre, rotated by ``rotation`` deg.

    The shape's vertices lie on a circle of ``radius`` around the centre, so any rotation stays inside.
    The colour texture is generated once per example (same rng draw order for input and target).
    """
    side = 2 * radius + 4
    big = side * SUPERSAMPLE
    centre = big / 2.0
    r = radius * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "disc":
        draw.ellipse((centre - r, centre - r, centre + r, centre + r), fill=255)
    else:
        n_vertices, phase = (4, 45.0) if shape == "square" else (3, -90.0)  # triangle points up
        # Screen y grows downwards, so a counter-clockwise turn on screen subtracts from the angle.
        angles = [math.radians(phase - rotation + k * 360.0 / n_vertices) for k in range(n_vertices)]
        draw.polygon([(centre + r * math.cos(a), centre + r * math.sin(a)) for a in angles], fill=255)
    shade = 0.8 + 0.2 * _smooth_noise(rng, big, 4)  # brightness texture in [0.8, 1.0]
    if rotation:
        # The texture turns with the object: rotate the texture image about the same centre.
        shade_img = Image.fromarray(shade.astype(np.float32))
        shade = np.asarray(shade_img.rotate(rotation, Image.Resampling.BILINEAR, fillcolor=0.9))
    rgb = np.clip(np.rint(shade[..., None] * np.asarray(COLORS[color], np.float32)), 0, 255).astype(np.uint8)
    sprite = Image.fromarray(np.dstack([rgb, np.asarray(mask)]))
    return sprite.resize((side, side), Image.Resampling.BOX)  # PIL premultiplies alpha for RGBA resizes


def _compose(background: np.ndarray, sprite: Image.Image, cx: int, cy: int) -> np.ndarray:
    """Paste ``sprite`` centred on pixel-grid point (cx, cy) (integer) over the background."""
    img = Image.fromarray(background)
    side = sprite.size[0]
    img.paste(sprite.convert("RGB"), (cx - side // 2, cy - side // 2), mask=sprite.getchannel("A"))
    return np.asarray(img)


def make_example(seed: int, index: int, size: int = DataConfig.synthetic_size,
                 reference: bool = DataConfig.synthetic_reference, *,
                 pan_share: float = DataConfig.synthetic_pan_share,
                 pan_pixels: int = DataConfig.synthetic_pan_pixels) -> SyntheticExample:  # fmt: skip
    """Render example ``index`` of the set with this ``seed`` (deterministic, independent of the set size); a
    `pan_share` of examples gets a camera pan of `pan_pixels` on its target (module docstring).

    With ``reference``, the example gets a second input image: the object at its destination on a grey canvas (a
    layout reference, for the families that take several input images). It draws no random number, so the
    example's other images are the same with and without it."""
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels so a moving shape fits, got {size}")
    rng = np.random.default_rng([seed, index, size])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    radius = int(rng.integers(max(4, size // 9), max(5, size // 6) + 1))
    rotate = shape != "disc" and rng.random() < 0.4
    dx = dy = 0
    rotation = 0.0
    if rotate:
        rotation = float(ROTATION_DEGREES[rng.integers(len(ROTATION_DEGREES))]) * (1 if rng.random() < 0.5 else -1)
        sense = "counterclockwise" if rotation > 0 else "clockwise"
        prompt = f"rotate the {color} {shape} {abs(rotation):g} degrees {sense}"
        category = CATEGORY_ROTATE
    else:
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        amount = int(rng.integers(max(2, size // 16), max(3, size // 4) + 1))
        dx, dy = (amount * u for u in DIRECTIONS[direction])
        prompt = f"move the {color} {shape} {amount} pixels {'to the ' if direction in ('left', 'right') else ''}"
        prompt += direction
        category = CATEGORY_TRANSLATE
    # Centre such that the sprite (half side radius+2) stays inside the frame before and after the move.
    half = radius + 2
    lo_x, hi_x = half - min(dx, 0), size - half - max(dx, 0)
    lo_y, hi_y = half - min(dy, 0), size - half - max(dy, 0)
    cx, cy = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))

    background = _background(rng, size)
    texture_state = rng.bit_generator.state  # same texture draw for input and target sprites
    input_sprite = _sprite(rng, shape, color, radius, 0.0)
    rng.bit_generator.state = texture_state
    target_sprite = _sprite(rng, shape, color, radius, rotation)
    target = _compose(background, target_sprite, cx + dx, cy + dy)
    cam_dx, cam_dy = camera_pan(seed, index, size, share=pan_share, pixels=pan_pixels)
    if cam_dx or cam_dy:
        target = pan_image(target, cam_dx, cam_dy)
    return SyntheticExample(
        id=f"synth-{seed}-{index:06d}",
        prompt=prompt,
        category=category,
        input_image=_compose(background, input_sprite, cx, cy),
        target_image=target,
        motion_dx=dx,
        motion_dy=dy,
        motion_rot=rotation,
        object_shape=shape,
        object_color=color,
        object_x=float(cx),
        object_y=float(cy),
        reference_image=_compose(np.full_like(background, 128), target_sprite, cx + dx, cy + dy) if reference else None,
        camera_dx=cam_dx,
        camera_dy=cam_dy,
    )


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


_EXTRA_FIELDS = ("motion_dx", "motion_dy", "motion_rot", "object_shape", "object_color", "object_x", "object_y")


def _hf_features_metadata(several: bool = False) -> bytes:
    """The ``huggingface`` schema metadata that makes ``datasets`` read the image columns as ``Image`` (a list of
    them for ``input_image`` with ``several`` input images)."""
    value = {"_type": "Value"}
    features = {
        "id": {**value, "dtype": "string"},
        "prompt": {**value, "dtype": "string"},
        "input_image": [{"_type": "Image"}] if several else {"_type": "Image"},
        "target_image": {"_type": "Image"},
        "category": {**value, "dtype": "string"},
        "motion_dx": {**value, "dtype": "int32"},
        "motion_dy": {**value, "dtype": "int32"},
        "motion_rot": {**value, "dtype": "float32"},
        "object_shape": {**value, "dtype": "string"},
        "object_color": {**value, "dtype": "string"},
        "object_x": {**value, "dtype": "float32"},
        "object_y": {**value, "dtype": "float32"},
    }
    return json.dumps({"info": {"features": features}}).encode()


def _inputs(ex: SyntheticExample) -> list[np.ndarray]:
    return [ex.input_image] + ([] if ex.reference_image is None else [ex.reference_image])


def _write_parquet(examples: list[SyntheticExample], path: Path) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    several = examples[0].reference_image is not None  # then input_image is a list: the input, the reference
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("input_image", pa.list_(image_type) if several else image_type),
            ("target_image", image_type),
            ("category", pa.string()),
            ("motion_dx", pa.int32()),
            ("motion_dy", pa.int32()),
            ("motion_rot", pa.float32()),
            ("object_shape", pa.string()),
            ("object_color", pa.string()),
            ("object_x", pa.float32()),
            ("object_y", pa.float32()),
        ],
        metadata={b"huggingface": _hf_features_metadata(several)},
    )
    rows = [
        {
            "id": ex.id,
            "prompt": ex.prompt,
            "input_image": (
                [{"bytes": _png_bytes(im), "path": f"{ex.id}_input{i or ''}.png"} for i, im in enumerate(_inputs(ex))]
                if several else {"bytes": _png_bytes(ex.input_image), "path": f"{ex.id}_input.png"}
            ),
            "target_image": {"bytes": _png_bytes(ex.target_image), "path": f"{ex.id}_target.png"},
            "category": ex.category,
            **{name: getattr(ex, name) for name in _EXTRA_FIELDS},
        }
        for ex in examples
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_jsonl(examples: list[SyntheticExample], out_dir: Path) -> Path:
    (out_dir / "images").mkdir(exist_ok=True)
    lines = []
    for ex in examples:
        inputs = [f"images/{ex.id}_input{i or ''}.png" for i in range(len(_inputs(ex)))]
        for rel, image in zip(inputs, _inputs(ex), strict=True):
            Image.fromarray(image).save(out_dir / rel)
        target = f"images/{ex.id}_target.png"
        Image.fromarray(ex.target_image).save(out_dir / target)
        paths = [inputs if len(inputs) > 1 else inputs[0], target]
        row = {"id": ex.id, "prompt": ex.prompt, "image": paths, "category": ex.category}
        row.update({name: getattr(ex, name) for name in _EXTRA_FIELDS})
        lines.append(json.dumps(row))
    manifest = out_dir / JSONL_NAME
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def generate_synthetic(
    out_dir: str | Path,
    n: int,
    *,
    size: int = DataConfig.synthetic_size,
    seed: int = DataConfig.seed,
    fmt: str = "parquet",
    reference: bool = DataConfig.synthetic_reference,
) -> Path:
    """Write ``n`` synthetic motion edits to ``out_dir``; returns the parquet file or the JSONL manifest.

    ``fmt="parquet"``: ``out_dir/synthetic.parquet`` in the MotionEdit hub form (PNG bytes in
    ``{bytes, path}`` image structs). ``fmt="jsonl"``: ``out_dir/metadata.jsonl`` rows
    ``{"id", "prompt", "image": [input, target], "category", ...truth}`` with PNGs under ``out_dir/images/``.
    With ``reference`` each row has two input images (`make_example`): a list in ``input_image`` / ``image[0]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"fmt must be 'parquet' or 'jsonl', got {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = [make_example(seed, i, size, reference) for i in range(n)]
    if fmt == "jsonl":
        return _write_jsonl(examples, out_dir)
    path = out_dir / PARQUET_NAME
    _write_parquet(examples, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, required=True, help="number of examples")
    parser.add_argument("--size", type=int, default=DataConfig.synthetic_size, help="image side in pixels (>= 32)")
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    parser.add_argument("--fmt", choices=("parquet", "jsonl"), default="parquet")
    parser.add_argument("--reference", action="store_true", help="a second input image per example (make_example)")
    args = parser.parse_args(argv)
    path = generate_synthetic(args.out, args.n, size=args.size, seed=args.seed, fmt=args.fmt,
                              reference=args.reference)
    print(f"wrote {args.n} examples ({args.size}x{args.size}) to {path}")


if __name__ == "__main__":
    main()
