"""MotionEdit triplets (input image, instruction, target image) from parquet, JSONL or folders, local or S3.

Accepted sources (docs/cluster.md):

- a **parquet** file in the hub form of ``MotionEdit-Train`` / ``MotionEdit-Bench``: columns ``id``, ``prompt``,
  ``input_image``, ``target_image`` (the ``datasets`` library's Image form, a struct ``{bytes, path}``; plain
  binary or a path string also work; a ``path`` without bytes is read relative to the parquet file), optional
  ``category``; ``input_image`` may also be a list of images (several input images, for the families that take
  them; a MotionEdit row has one);
- a **JSONL manifest**, the reference code's local form: one object per line
  ``{"prompt": ..., "image": [input_path, target_path]}`` with paths relative to the manifest file, optional
  ``id`` and ``category``; without an ``id`` the row gets a stable one derived from its content
  (``<input stem>-<8 hex of sha1(prompt, paths)>``), so it does not change when rows are reordered; several input
  images are ``[[input_path, reference_path, ...], target_path]``;
- a **folder** holding ``*.parquet`` files, or ``*.jsonl`` manifests (searched recursively, hidden entries
  ignored, sorted by path; a folder with more than one kind is an error), or **example folders**::

      <root>/<name>/meta.json     {"prompt": ..., optional "id" (default <name>), optional "category", ...}
      <root>/<name>/input.png     (any of .png .jpg .jpeg .webp .bmp)
      <root>/<name>/target.png

- any of these under ``s3://bucket/prefix``: downloaded to ``cache_dir/<bucket>/<key>`` with
  :mod:`motionnft_core.s3` (unchanged files are not fetched again). A ``.parquet`` key downloads that one file, a
  ``.jsonl`` key downloads its whole directory (its images are relative to it), any other key is a folder.
  (A parquet file fetched alone must embed its image bytes; path-only images come with a folder source.)

Fields other than the known ones (e.g. the synthetic set's ``motion_dx``) are kept in ``MotionExample.extra``.

With several input images the first is ``MotionExample.input_image``, the motion source the flow reward compares the
edit with; the others, in order, are ``MotionExample.reference_images``; every one is checked and resized like it.

Validation happens once, at load: every row is parsed and **both images are fully decoded** (``Image.load()``,
not ``verify()``: ``verify`` checks PNG chunk CRCs but does nothing for JPEG, and a full decode catches every
truncated or corrupt file of any format; it costs one decode per image, spread over a thread pool). A bad row
(missing field, missing image file, undecodable image, unknown category, duplicate id, an image narrower or
lower than the given resolution — unless ``upscale_small``: then it is upscaled, counted in
``dataset.upscaled`` and logged once — or, when no resolution is given, input and target of different sizes)
is reported with its file, row and id: ``on_error="raise"`` raises :class:`DataError`, ``on_error="skip"``
drops the row, logs one warning listing every dropped row, and records it in ``dataset.skipped``. Row
numbers are 1-based line numbers for JSONL, 0-based row indices for parquet (each file type's usual
convention) and 0-based positions among the sorted example folders.

Examples stay encoded in memory (bytes for parquet rows, paths for files) and are decoded in
``__getitem__``; with a ``resolution`` ``(H, W)`` both images are centre-cropped to that aspect ratio (as the
reference code crops to a square) and resized with PIL's bilinear filter, which is antialiased when
downscaling (its support widens with the scale factor). Every image mode is first made 8-bit RGB by
:func:`to_rgb` (16-bit scaled, not clipped; alpha composited over white; CMYK converted naively).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import operator
import os
import posixpath
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from motionnft_core import s3
from motionnft_core.cache import build_atomically, builder_key
from motionnft_core.config import Config, DataConfig
from motionnft_core.data import synthetic

logger = logging.getLogger(__name__)

CATEGORIES = (
    "Pose/Posture",
    "Locomotion/Distance",
    "Object State/Formation",
    "Orientation/Viewpoint",
    "Subject-Object Interaction",
    "Inter-Subject Interaction",
)
PARQUET_COLUMNS = ("id", "prompt", "input_image", "target_image")  # required; "category" is optional
JSONL_KEYS = ("prompt", "image")  # required; "id" and "category" are optional
EXAMPLE_META = "meta.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHECK_THREADS = 8  # image checks at load; PIL releases the GIL while decoding
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

ImageRef = bytes | Path  # encoded image bytes, or the path of an image file


class DataError(ValueError):
    """A data source is unusable: a bad row (with on_error="raise"), a bad schema, or no rows at all."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from, for error messages: file (or example folder), row number, id if known."""

    source: str
    row: int
    id: str | None = None
    unit: str = "row"  # "line" for JSONL (1-based), "row" for parquet and example folders (0-based)

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.row}" + (f" (id={self.id!r})" if self.id is not None else "")


@dataclass
class MotionExample:
    """One decoded triplet. Images are uint8 (3, H, W), at the dataset's resolution when it has one."""

    id: str
    prompt: str
    input_image: torch.Tensor
    target_image: torch.Tensor
    category: str | None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown columns/keys, e.g. motion_dx
    reference_images: tuple[torch.Tensor, ...] = ()  # input images after the first (the motion source), in order

    @property
    def input_images(self) -> list[torch.Tensor]:
        """Every input image in order, the motion source first: what the policy conditions on."""
        return [self.input_image, *self.reference_images]


@dataclass(frozen=True)
class _Record:
    """One validated, still-encoded row."""

    id: str
    prompt: str
    input_image: ImageRef
    target_image: ImageRef
    category: str | None
    extra: dict[str, Any]
    where: RowRef
    reference_images: tuple[ImageRef, ...] = ()


class _RowError(Exception):
    """A problem with one row; becomes a DataError or a skipped entry depending on on_error."""


@dataclass(frozen=True)
class _Names:
    """Maps local paths to the names used in messages (the s3:// URI for downloaded files)."""

    local_root: Path | None = None
    display_root: str = ""

    def __call__(self, path: Path) -> str:
        if self.local_root is None:
            return str(path)
        try:
            rel = path.relative_to(self.local_root).as_posix()
        except ValueError:
            return str(path)
        return self.display_root if rel == "." else f"{self.display_root}/{rel}"


# ----------------------------------------------------------------------------------------------- decoding


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded PIL image as 8-bit RGB, by one stated rule per mode (pure; raises ValueError for a mode
    with no defined rule, e.g. ``F``, which becomes a bad row at load):

    - ``RGB``, ``L``, ``1``, ``YCbCr``, ``HSV`` (no transparency): PIL's ``convert("RGB")``; grey values are
      copied to all three channels.
    - 16 bit, ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` and ``I`` (the mode 16-bit PNGs load as; ``I`` is
      read as 16-bit samples, clamped to [0, 65535]): grey ``v >> 8``, so 65535 -> 255, 256 -> 1, 255 -> 0.
      (PIL's own conversion clips every value above 255 to white.) A tRNS colour key is ignored here.
    - ``CMYK``: naive, without colour management (an embedded ICC profile is ignored):
      ``R = round((255 - C) * (255 - K) / 255)``, likewise G from M and B from Y.
    - alpha (``RGBA``, ``RGBa``, ``LA``, ``PA``, and ``P`` / ``L`` / ``RGB`` with a ``transparency``
      entry, i.e. a palette with transparent entries or a PNG tRNS colour key): converted to straight RGBA by
      PIL, then **composited over white**: ``c' = (c * a + 255 * (255 - a) + 127) // 255`` (``a = 255`` keeps
      ``c``, ``a = 0`` gives 255). Fully transparent pixels are white whatever colour they store.
    - ``P`` without transparency: the palette colours.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1), "RGB")
    if mode == "CMYK":
        cmyk = np.asarray(image).astype(np.int64)
        white = 255 - cmyk[..., 3:]
        rgb = ((255 - cmyk[..., :3]) * white * 2 + 255) // 510  # round half up of (255-c)(255-k)/255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.int64)
        alpha = rgba[..., 3:]
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode in ("RGB", "L", "1", "P", "YCbCr", "HSV"):
        return image.convert("RGB")
    raise ValueError(f"unsupported image mode {mode!r} (no defined conversion to 8-bit RGB)")


def to_rgb_uint8(image: Image.Image) -> torch.Tensor:
    """:func:`to_rgb` as a uint8 tensor (3, H, W)."""
    return _to_tensor(to_rgb(image))


def _open_rgb(ref: ImageRef) -> Image.Image:
    """Fully decode an image to 8-bit RGB by :func:`to_rgb` (raises PIL's errors for truncated or corrupt data,
    ValueError for a mode :func:`to_rgb` does not handle)."""
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
        img.load()
        return to_rgb(img)


def _fit(img: Image.Image, resolution: tuple[int, int] | None) -> Image.Image:
    """Centre-crop to the aspect ratio of (H, W), then bilinear (antialiased) resize to W x H."""
    if resolution is None:
        return img
    height, width = resolution
    w, h = img.size
    if (w, h) == (width, height):
        return img
    if w * height > h * width:  # too wide: crop columns
        crop_w = h * width / height
        box = ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
    else:  # too tall (or exact aspect): crop rows
        crop_h = w * height / width
        box = (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)
    return img.resize((width, height), Image.Resampling.BILINEAR, box=box)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def _describe(ref: ImageRef, names: _Names, label: str) -> str:
    return f"{label} {names(ref)}" if isinstance(ref, Path) else f"{label} (embedded bytes)"


def _check_images(
    record: _Record, names: _Names, resolution: tuple[int, int] | None, upscale_small: bool = False
) -> int:
    """Decode both images fully; without a resolution the pair must match in size (no resize will fix it).
    With one, an image narrower or lower than it is a bad row unless ``upscale_small``. Returns how many of
    the two images will be upscaled."""
    sizes = []
    labelled = [("input image", record.input_image), ("target image", record.target_image)]
    labelled += [(f"input image {i}", ref) for i, ref in enumerate(record.reference_images, start=2)]
    for label, ref in labelled:
        try:
            sizes.append(_open_rgb(ref).size)
        except _DECODE_ERRORS as err:
            raise _RowError(f"cannot decode {_describe(ref, names, label)}: {err}") from err
    if resolution is None:
        for (label, _), (w, h) in zip(labelled[1:], sizes[1:], strict=True):
            if (w, h) != sizes[0]:
                wi, hi = sizes[0]
                raise _RowError(f"input image is {wi}x{hi} but {label} is {w}x{h} (give a resolution to resize both)")
        return 0
    height, width = resolution
    labels = [label for label, _ in labelled]
    small = [(label, w, h) for label, (w, h) in zip(labels, sizes, strict=True) if w < width or h < height]
    if small and not upscale_small:
        label, w, h = small[0]
        raise _RowError(
            f"{label} is {w}x{h}, smaller than the resolution {width}x{height} (WxH); "
            "set data.upscale_small=true to upscale it"
        )
    return len(small)


# ------------------------------------------------------------------------------------------------ parsing


def _text(value: Any, name: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _RowError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise _RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _category(value: Any) -> str | None:
    if value is None:
        return None
    if value not in CATEGORIES:
        raise _RowError(f"unknown category {value!r} (expected one of {', '.join(CATEGORIES)})")
    return value


def _image_file(base: Path, rel: Any, name: str, names: _Names) -> Path:
    if not isinstance(rel, str) or not rel:
        raise _RowError(f"field {name!r} must be a non-empty path string, got {rel!r}")
    path = base / rel
    if not path.is_file():
        raise _RowError(f"missing image file {names(path)} ({name})")
    return path


def _parquet_image(value: Any, name: str, base: Path, names: _Names) -> ImageRef:
    """The datasets Image struct {bytes, path}, raw bytes, or a path relative to the parquet file."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return _image_file(base, value["path"], name, names)
        raise _RowError(f"missing field {name!r} (image struct has neither bytes nor path)")
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value)
    if isinstance(value, str) and value:
        return _image_file(base, value, name, names)
    raise _RowError(f"missing field {name!r}")


def _input_images(value: Any, name: str, image: Callable[[Any, str], ImageRef]) -> list[ImageRef]:
    """One input image, or a non-empty list of them (the motion source first), each read by `image`."""
    if not isinstance(value, list):
        return [image(value, name)]
    if not value:
        raise _RowError(f"field {name!r} is an empty list of input images")
    return [image(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _parquet_rows(path: Path, names: _Names) -> Iterator[tuple[RowRef, _Record | _RowError]]:
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    missing = [c for c in PARQUET_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{names(path)}: missing column(s) {missing} (has {columns})")
    row = 0
    for batch in parquet.iter_batches(batch_size=256):
        for values in batch.to_pylist():
            raw_id = values.get("id")
            where = RowRef(names(path), row, raw_id if isinstance(raw_id, str) else None)
            try:
                inputs = _input_images(values.get("input_image"), "input_image",
                                       lambda v, name: _parquet_image(v, name, path.parent, names))  # fmt: skip
                record = _Record(
                    id=_text(raw_id, "id"),
                    prompt=_text(values.get("prompt"), "prompt"),
                    input_image=inputs[0],
                    target_image=_parquet_image(values.get("target_image"), "target_image", path.parent, names),
                    category=_category(values.get("category")),
                    extra={k: v for k, v in values.items() if k not in (*PARQUET_COLUMNS, "category")},
                    where=where,
                    reference_images=tuple(inputs[1:]),
                )
                yield where, record
            except _RowError as err:
                yield where, err
            row += 1


def _content_id(prompt: str, input_rel: str | list[str], target_rel: str) -> str:
    digest = hashlib.sha1(json.dumps([prompt, input_rel, target_rel]).encode()).hexdigest()[:8]
    first = input_rel[0] if isinstance(input_rel, list) else input_rel
    return f"{Path(first).stem}-{digest}"


def _jsonl_rows(path: Path, names: _Names) -> Iterator[tuple[RowRef, _Record | _RowError]]:
    with path.open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = RowRef(names(path), line_no, unit="line")
        try:
            try:
                values = json.loads(line)
            except json.JSONDecodeError as err:
                raise _RowError(f"invalid JSON: {err}") from err
            if not isinstance(values, dict):
                raise _RowError(f"expected a JSON object, got {type(values).__name__}")
            raw_id = values.get("id")
            if isinstance(raw_id, str) and raw_id:
                where = RowRef(where.source, line_no, raw_id, unit="line")
            prompt = _text(values.get("prompt"), "prompt")
            images = values.get("image")
            if images is None:
                raise _RowError("missing field 'image'")
            if not isinstance(images, list) or len(images) != 2:
                raise _RowError(f"field 'image' must be [input_path, target_path], got {images!r}")
            inputs = _input_images(images[0], "image[0]", lambda v, name: _image_file(path.parent, v, name, names))
            target_path = _image_file(path.parent, images[1], "image[1]", names)
            first = images[0][0] if isinstance(images[0], list) else images[0]
            rels = images[0] if isinstance(images[0], list) and len(images[0]) > 1 else first  # one: as before
            record_id = _text(raw_id, "id") if "id" in values else _content_id(prompt, rels, images[1])
            record = _Record(
                id=record_id,
                prompt=prompt,
                input_image=inputs[0],
                target_image=target_path,
                category=_category(values.get("category")),
                extra={k: v for k, v in values.items() if k not in (*JSONL_KEYS, "id", "category")},
                where=RowRef(where.source, line_no, record_id, unit="line"),
                reference_images=tuple(inputs[1:]),
            )
            yield record.where, record
        except _RowError as err:
            yield where, err


def _single_image(folder: Path, stem: str, names: _Names) -> Path:
    found = sorted(p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise _RowError(f"missing image file {names(folder / stem)}.* (one of {', '.join(IMAGE_SUFFIXES)})")
    if len(found) > 1:
        raise _RowError(f"ambiguous {stem} image: {', '.join(names(p) for p in found)}")
    return found[0]


def _example_rows(folders: list[Path], names: _Names) -> Iterator[tuple[RowRef, _Record | _RowError]]:
    for row, folder in enumerate(folders):
        where = RowRef(names(folder), row, folder.name)
        try:
            meta_path = folder / EXAMPLE_META
            if not meta_path.is_file():
                raise _RowError(f"missing {EXAMPLE_META}")
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise _RowError(f"invalid JSON in {EXAMPLE_META}: {err}") from err
            if not isinstance(meta, dict):
                raise _RowError(f"{EXAMPLE_META} must hold a JSON object")
            record_id = _text(meta.get("id", folder.name), "id")
            where = RowRef(where.source, row, record_id)
            record = _Record(
                id=record_id,
                prompt=_text(meta.get("prompt"), "prompt"),
                input_image=_single_image(folder, "input", names),
                target_image=_single_image(folder, "target", names),
                category=_category(meta.get("category")),
                extra={k: v for k, v in meta.items() if k not in ("id", "prompt", "category")},
                where=where,
            )
            yield where, record
        except _RowError as err:
            yield where, err


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _is_example_folder(path: Path) -> bool:
    return path.is_dir() and any(
        p.name == EXAMPLE_META or (p.stem in ("input", "target") and p.suffix.lower() in IMAGE_SUFFIXES)
        for p in path.iterdir()
    )


def _source_rows(path: Path, names: _Names) -> Iterator[tuple[RowRef, _Record | _RowError]]:
    """Dispatch on the kind of local source; see the module docstring."""
    if path.is_file():
        if path.suffix == ".parquet":
            yield from _parquet_rows(path, names)
        elif path.suffix == ".jsonl":
            yield from _jsonl_rows(path, names)
        else:
            raise DataError(f"{names(path)}: unsupported file type (expected .parquet or .jsonl)")
        return
    if not path.is_dir():
        raise FileNotFoundError(f"data source not found: {names(path)}")
    parquets = sorted(p for p in path.rglob("*.parquet") if p.is_file() and _visible(p, path))
    manifests = sorted(p for p in path.rglob("*.jsonl") if p.is_file() and _visible(p, path))
    examples = sorted(p for p in path.iterdir() if _visible(p, path) and _is_example_folder(p))
    kinds = {"parquet files": parquets, "JSONL manifests": manifests, "example folders": examples}
    present = [kind for kind, found in kinds.items() if found]
    if not present:
        raise DataError(f"{names(path)}: no *.parquet, *.jsonl or example folders (<id>/{EXAMPLE_META}) found")
    if len(present) > 1:
        raise DataError(f"{names(path)}: ambiguous folder, it holds {' and '.join(present)}; point at one of them")
    for parquet in parquets:
        yield from _parquet_rows(parquet, names)
    for manifest in manifests:
        yield from _jsonl_rows(manifest, names)
    if examples:
        yield from _example_rows(examples, names)


def _fetch_s3(uri: str, cache_dir: str | os.PathLike | None) -> tuple[Path, _Names]:
    """Download an s3:// source into ``cache_dir/<bucket>/<key>``; returns the local path and message names."""
    if cache_dir is None:
        raise ValueError(f"{uri}: an s3:// data source needs a cache_dir to download into")
    bucket, key = s3.split_s3_uri(uri)
    root = Path(cache_dir).expanduser() / bucket
    names = _Names(root, f"{s3.S3_SCHEME}{bucket}")
    key = key.rstrip("/")
    if key.endswith(".parquet"):
        return s3.download_file(uri, root / key), names
    if key.endswith(".jsonl"):
        parent = posixpath.dirname(key)
        s3.download_prefix(f"{s3.S3_SCHEME}{bucket}/{parent}", root / parent)
        return root / key, names
    return s3.download_prefix(uri, root / key), names


# ------------------------------------------------------------------------------------------------ dataset


class MotionEditDataset(Sequence[MotionExample]):
    """Validated MotionEdit triplets, decoded lazily. Build with :meth:`from_source`."""

    def __init__(
        self,
        records: Sequence[_Record],
        *,
        resolution: tuple[int, int] | None = None,
        skipped: Sequence[tuple[RowRef, str]] = (),
        upscaled: int = 0,
    ):
        self._records = list(records)
        self.resolution = resolution
        self.skipped: list[tuple[RowRef, str]] = list(skipped)  # (row, reason) dropped by on_error="skip"
        self.upscaled = upscaled  # images (input and target counted apart) smaller than resolution, upscaled

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike,
        *,
        on_error: str,
        resolution: tuple[int, int] | None = None,
        cache_dir: str | os.PathLike | None = None,
        upscale_small: bool = DataConfig.upscale_small,
    ) -> MotionEditDataset:
        """Load and validate a parquet file, JSONL manifest or folder, local or ``s3://`` (module docstring).

        ``on_error`` has no default here: a run passes ``data.on_error`` (the config holds the default).

        With a ``resolution``, an image narrower or lower than it is a bad row (``on_error``), or with
        ``upscale_small`` is upscaled: the kept rows' upscaled images are counted in ``dataset.upscaled`` and
        logged once (one warning)."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if resolution is not None:
            if len(resolution) != 2 or not all(isinstance(v, int) and v > 0 for v in resolution):
                raise ValueError(f"resolution must be (height, width) positive ints, got {resolution!r}")
            resolution = (int(resolution[0]), int(resolution[1]))
        if s3.is_s3_uri(source):
            path, names = _fetch_s3(str(source), cache_dir)
        else:
            path, names = Path(source), _Names()

        parsed = list(_source_rows(path, names))
        bad: dict[int, str] = {}  # position in `parsed` -> reason
        candidates = []
        for pos, (_, item) in enumerate(parsed):
            if isinstance(item, _RowError):
                bad[pos] = str(item)
            else:
                candidates.append((pos, item))

        def check(candidate: tuple[int, _Record]) -> tuple[int, str | int]:
            pos, record = candidate
            try:
                return pos, _check_images(record, names, resolution, upscale_small)
            except _RowError as err:
                return pos, str(err)

        upscaled_at: dict[int, int] = {}  # position in `parsed` -> images of that row to upscale
        with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, os.cpu_count() or 1)) as pool:
            for pos, result in pool.map(check, candidates):
                if isinstance(result, str):
                    bad[pos] = result
                elif result:
                    upscaled_at[pos] = result

        records, first_seen = [], {}
        for pos, record in candidates:
            if pos in bad:
                continue
            if record.id in first_seen:
                bad[pos] = f"duplicate id {record.id!r} (first at {first_seen[record.id]})"
                continue
            first_seen[record.id] = record.where
            records.append(record)

        skipped = [(parsed[pos][0], bad[pos]) for pos in sorted(bad)]
        if skipped and on_error == "raise":
            where, reason = skipped[0]
            more = f" (and {len(skipped) - 1} more bad rows)" if len(skipped) > 1 else ""
            raise DataError(f"{where}: {reason}{more}")
        if skipped:
            listing = "\n  ".join(f"{where}: {reason}" for where, reason in skipped)
            logger.warning("skipped %d of %d rows of %s:\n  %s", len(skipped), len(parsed), names(path), listing)
        if not records:
            raise DataError(f"{names(path)}: no usable rows ({len(parsed)} read, {len(skipped)} skipped)")
        upscaled_rows = [n for pos, n in upscaled_at.items() if pos not in bad]
        upscaled = sum(upscaled_rows)
        if upscaled:
            assert resolution is not None
            logger.warning(
                "upscaled %d images (in %d of %d rows) of %s: smaller than the resolution %dx%d (WxH)",
                upscaled, len(upscaled_rows), len(records), names(path), resolution[1], resolution[0],
            )  # fmt: skip
        return cls(records, resolution=resolution, skipped=skipped, upscaled=upscaled)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        """``dataset[i]`` decodes one example; ``dataset[a:b]`` is a (lazy) sub-dataset."""
        if isinstance(index, slice):
            return MotionEditDataset(self._records[index], resolution=self.resolution)
        record = self._records[operator.index(index)]
        return MotionExample(
            id=record.id,
            prompt=record.prompt,
            input_image=_to_tensor(_fit(_open_rgb(record.input_image), self.resolution)),
            target_image=_to_tensor(_fit(_open_rgb(record.target_image), self.resolution)),
            category=record.category,
            extra=dict(record.extra),
            reference_images=tuple(_to_tensor(_fit(_open_rgb(r), self.resolution)) for r in record.reference_images),
        )

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self._records]

    @property
    def prompts(self) -> list[str]:
        """Prompts without decoding any image (for samplers that ban prompts)."""
        return [r.prompt for r in self._records]

    def split(self, eval_fraction: float, seed: int) -> tuple[MotionEditDataset, MotionEditDataset]:
        """(train, eval) by hashing ``(seed, id)``: an id lands on the same side for a seed, whatever else is in
        the set, so the eval fraction is met only approximately. Either side empty raises DataError."""
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        train, evaluation = [], []
        for record in self._records:
            digest = hashlib.sha256(f"{seed}:{record.id}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
            (evaluation if u < eval_fraction else train).append(record)
        if not train or not evaluation:
            raise DataError(
                f"split of {len(self)} examples with eval_fraction={eval_fraction}, seed={seed} left the "
                f"{'train' if not train else 'eval'} side empty; use more data or another fraction"
            )
        return (
            MotionEditDataset(train, resolution=self.resolution),
            MotionEditDataset(evaluation, resolution=self.resolution),
        )

    def split_by(self, column: str) -> tuple[MotionEditDataset, MotionEditDataset]:
        """(train, eval) by each row's `column` ("train" or "eval"), the split a curated set was made with (by
        source video, curation/output.py). A row without one of the two values raises DataError naming it; so does
        an empty side."""
        train, evaluation = [], []
        for record in self._records:
            value = record.extra.get(column)
            if value not in ("train", "eval"):
                raise DataError(f"{record.where}: data.split_column {column!r} is {value!r}, expected 'train' or "
                                "'eval'")  # fmt: skip
            (evaluation if value == "eval" else train).append(record)
        if not train or not evaluation:
            raise DataError(
                f"split of {len(self)} examples by column {column!r} left the {'train' if not train else 'eval'} "
                "side empty; curate more videos or another output.eval_fraction"
            )
        return (
            MotionEditDataset(train, resolution=self.resolution),
            MotionEditDataset(evaluation, resolution=self.resolution),
        )

    def __repr__(self) -> str:
        return (
            f"MotionEditDataset(n={len(self)}, resolution={self.resolution}, skipped={len(self.skipped)}, "
            f"upscaled={self.upscaled})"
        )


class ExampleServer:
    """Ray actor shell holding a dataset: hands out decoded examples by index, each straight into the object
    store, so neither the driver nor every task re-deserializes the whole set."""

    def __init__(self, dataset: MotionEditDataset) -> None:
        self.dataset = dataset

    def get(self, index: int) -> MotionExample:
        return self.dataset[index]


def load_splits(cfg: Config) -> tuple[MotionEditDataset, MotionEditDataset]:
    """The run's (train, eval) splits at the rollout resolution (`data.*`, `rollout.height/width`): by id hash, or
    by `data.split_column` (a curated set's split by source video).

    Without `data.source`, `data.synthetic` examples are generated once into `<model.cache_dir>/synthetic`
    (keyed by the generator's source) and used; an `s3://` source is downloaded into `<model.cache_dir>/data`.
    Images smaller than the resolution are bad rows unless `data.upscale_small`; generated synthetic images
    (`data.synthetic_size`, which may be below the resolution) are always upscaled when needed.
    """
    d, cache = cfg.data, Path(cfg.model.cache_dir).expanduser()
    source = d.source
    if not source:
        reference = "_ref" if d.synthetic_reference else ""
        name = f"n{d.synthetic}_s{d.synthetic_size}_seed{d.seed}{reference}-{builder_key(synthetic)}"
        out = build_atomically(
            cache / "synthetic" / name,
            lambda tmp: synthetic.generate_synthetic(tmp, d.synthetic, size=d.synthetic_size, seed=d.seed,
                                                     reference=d.synthetic_reference),  # fmt: skip
            complete=lambda p: (p / synthetic.PARQUET_NAME).is_file(),
            what="synthetic data set",
        )
        source = str(out / synthetic.PARQUET_NAME)
    ds = MotionEditDataset.from_source(
        source,
        resolution=(cfg.rollout.height, cfg.rollout.width),
        on_error=d.on_error,
        cache_dir=str(cache / "data"),
        upscale_small=d.upscale_small or not d.source,
    )
    if d.split_column:
        return ds.split_by(d.split_column)
    if d.eval_fraction == 0:
        return ds, ds[0:0]
    return ds.split(d.eval_fraction, d.seed)
