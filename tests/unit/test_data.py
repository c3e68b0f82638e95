"""MotionEdit data layer: synthetic generator, the three source kinds (local and S3), split, validation."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from motionnft_core.data.motionedit import CATEGORIES, DataError, MotionEditDataset, load_splits, to_rgb_uint8
from motionnft_core.data.synthetic import generate_synthetic, main, make_example
from tests.storage_helpers import upload_dir

N, SIZE, SEED = 12, 64, 0  # seed 0 gives both rotations (rows 3, 7) and translations in the first 12
SATURATION = 80  # object pixels have max(rgb) - min(rgb) >= ~120, the background <= ~40


def _mask(image: torch.Tensor) -> np.ndarray:
    """Object pixels of a (3, H, W) uint8 synthetic image: the only saturated colour in the frame."""
    a = image.permute(1, 2, 0).numpy().astype(int)
    return (a.max(-1) - a.min(-1)) > SATURATION


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _rotate_mask(mask: np.ndarray, degrees: float, centre: np.ndarray) -> np.ndarray:
    """PIL rotation (counter-clockwise for positive degrees) about a centre given in pixel indices."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    img = img.rotate(degrees, Image.Resampling.BILINEAR, center=tuple(centre + 0.5))
    return np.asarray(img) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _assert_same(a: MotionEditDataset, b: MotionEditDataset) -> None:
    assert a.ids == b.ids
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.prompt, x.category) == (y.id, y.prompt, y.category)
        assert torch.equal(x.input_image, y.input_image)
        assert torch.equal(x.target_image, y.target_image)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    """The same synthetic set written in both formats (each in its own folder)."""
    root = tmp_path_factory.mktemp("synth")
    return {
        "parquet": generate_synthetic(root / "pq", N, size=SIZE, seed=SEED, fmt="parquet"),
        "jsonl": generate_synthetic(root / "js", N, size=SIZE, seed=SEED, fmt="jsonl"),
    }


def _copy_jsonl_set(synth: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(synth["jsonl"].parent, dest)
    return dest / synth["jsonl"].name


# ----------------------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_per_seed_and_index():
    a, b, c = make_example(3, 5, 48), make_example(3, 5, 48), make_example(4, 5, 48)
    assert np.array_equal(a.input_image, b.input_image) and np.array_equal(a.target_image, b.target_image)
    assert a.prompt == b.prompt
    assert not np.array_equal(a.input_image, c.input_image)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_synthetic_round_trip_shows_the_true_motion(synth, fmt):
    ds = MotionEditDataset.from_source(synth[fmt], on_error="raise")
    assert len(ds) == N and ds.skipped == []
    kinds = set()
    for ex in ds:
        assert ex.input_image.shape == ex.target_image.shape == (3, SIZE, SIZE)
        assert ex.input_image.dtype == torch.uint8
        dx, dy, rot = ex.extra["motion_dx"], ex.extra["motion_dy"], ex.extra["motion_rot"]
        m_in, m_tg = _mask(ex.input_image), _mask(ex.target_image)
        c_in, c_tg = _centroid(m_in), _centroid(m_tg)
        # Stored input centre uses pixel-corner coordinates: pixel index + 0.5.
        assert np.allclose(c_in + 0.5, [ex.extra["object_x"], ex.extra["object_y"]], atol=1.0)
        assert np.allclose(c_tg - c_in, [dx, dy], atol=0.5), (ex.prompt, c_tg - c_in)
        if rot:
            kinds.add("rotate")
            assert (dx, dy) == (0, 0) and ex.category == "Orientation/Viewpoint"
            assert f"{abs(rot):g} degrees {'counterclockwise' if rot > 0 else 'clockwise'}" in ex.prompt
            good = _iou(_rotate_mask(m_in, rot, c_in), m_tg)
            wrong_sense = _iou(_rotate_mask(m_in, -rot, c_in), m_tg)
            assert good > 0.8 and good > max(wrong_sense, _iou(m_in, m_tg)) + 0.05, (ex.prompt, good, wrong_sense)
        else:
            kinds.add("move")
            assert (dx == 0) != (dy == 0) and rot == 0 and ex.category == "Locomotion/Distance"
            direction = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}[
                (int(np.sign(dx)), int(np.sign(dy)))
            ]
            assert ex.prompt.endswith(f"{abs(dx + dy)} pixels {'to the ' if dx else ''}{direction}")
            # The object's own texture moves with it: interior pixels are an exact integer shift.
            interior = ~_dilate(~m_in, 1)
            ys, xs = np.nonzero(interior)
            assert len(ys) > 10
            assert torch.equal(ex.target_image[:, ys + dy, xs + dx], ex.input_image[:, ys, xs])
        # The object is the only thing that moves: everything away from both object positions is unchanged.
        still = ~_dilate(m_in | m_tg, 2)
        assert torch.equal(ex.input_image.permute(1, 2, 0)[still], ex.target_image.permute(1, 2, 0)[still])
    assert kinds == {"rotate", "move"}


def test_synthetic_parquet_has_hub_schema(synth):
    table = pq.read_table(synth["parquet"])
    assert table.num_rows == N
    image = table.schema.field("input_image").type
    assert [image.field(i).name for i in range(image.num_fields)] == ["bytes", "path"]
    meta = json.loads(table.schema.metadata[b"huggingface"])
    assert meta["info"]["features"]["target_image"] == {"_type": "Image"}
    assert set(table.column("category").to_pylist()) <= set(CATEGORIES)


def test_synthetic_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "3", "--size", "32", "--fmt", "jsonl"])
    assert "wrote 3 examples" in capsys.readouterr().out
    ds = MotionEditDataset.from_source(tmp_path / "metadata.jsonl", on_error="raise")
    assert len(ds) == 3 and ds[0].input_image.shape == (3, 32, 32)


# --------------------------------------------------------------------------------------------- sources


def test_parquet_jsonl_and_folders_load_the_same_examples(synth, tmp_path):
    from_parquet = MotionEditDataset.from_source(synth["parquet"], on_error="raise")
    _assert_same(from_parquet, MotionEditDataset.from_source(str(synth["jsonl"]), on_error="raise"))
    folder_of_parquet = MotionEditDataset.from_source(synth["parquet"].parent, on_error="raise")
    _assert_same(from_parquet, folder_of_parquet)
    folder_with_a_manifest = MotionEditDataset.from_source(synth["jsonl"].parent, on_error="raise")
    _assert_same(from_parquet, folder_with_a_manifest)

    # Folder-of-examples layout: <id>/input.png, <id>/target.png, <id>/meta.json.
    root = tmp_path / "examples"
    for ex in from_parquet:
        folder = root / ex.id
        folder.mkdir(parents=True)
        Image.fromarray(ex.input_image.permute(1, 2, 0).numpy()).save(folder / "input.png")
        Image.fromarray(ex.target_image.permute(1, 2, 0).numpy()).save(folder / "target.png")
        meta = {"prompt": ex.prompt, "category": ex.category, "motion_dx": ex.extra["motion_dx"]}
        (folder / "meta.json").write_text(json.dumps(meta))
    from_folders = MotionEditDataset.from_source(root, on_error="raise")
    _assert_same(from_parquet, from_folders)
    assert from_folders[1].extra["motion_dx"] == from_parquet[1].extra["motion_dx"]


def test_several_input_images_load_from_parquet_and_jsonl_in_order(tmp_path):
    """`input_image` (parquet) / `image[0]` (JSONL) may list several input images: the first is the motion source,
    the others are `reference_images` in order; the synthetic layout reference leaves the other images as they were."""
    plain = MotionEditDataset.from_source(generate_synthetic(tmp_path / "plain", 3, size=32, seed=1), on_error="raise")
    loaded = []
    for fmt in ("parquet", "jsonl"):
        src = generate_synthetic(tmp_path / fmt, 3, size=32, seed=1, fmt=fmt, reference=True)
        loaded.append(MotionEditDataset.from_source(src, on_error="raise", resolution=(32, 32)))
    for i, ex in enumerate(plain):
        truth = make_example(1, i, 32, reference=True)
        for ds in loaded:
            got = ds[i]
            assert torch.equal(got.input_image, ex.input_image) and torch.equal(got.target_image, ex.target_image)
            assert len(got.reference_images) == 1 and len(got.input_images) == 2
            assert torch.equal(got.reference_images[0], torch.from_numpy(truth.reference_image.copy()).permute(2, 0, 1))
        assert ex.reference_images == ()
    assert loaded[0].ids == plain.ids  # parquet ids are the rows' own; JSONL ids come from the rows too

    rows = pq.read_table(generate_synthetic(tmp_path / "empty", 1, size=32, reference=True)).to_pylist()
    rows[0]["input_image"] = []
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="'input_image' is an empty list of input images"):
        MotionEditDataset.from_source(tmp_path / "empty.parquet", on_error="raise")


def test_folder_with_two_kinds_is_ambiguous(synth, tmp_path):
    shutil.copy(synth["parquet"], tmp_path / "a.parquet")
    shutil.copy(synth["jsonl"], tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="ambiguous"):
        MotionEditDataset.from_source(tmp_path, on_error="raise")
    with pytest.raises(FileNotFoundError, match="nope"):
        MotionEditDataset.from_source(tmp_path / "nope", on_error="raise")


def test_jsonl_without_ids_gets_stable_content_ids(synth, tmp_path):
    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        del row["id"]
    manifest.write_text("\n".join(json.dumps(r) for r in rows[::-1]))  # reversed order
    ds = MotionEditDataset.from_source(manifest, on_error="raise")
    first = rows[0]
    digest = hashlib.sha1(json.dumps([first["prompt"], *first["image"]]).encode()).hexdigest()[:8]
    assert ds.ids[-1] == f"{Path(first['image'][0]).stem}-{digest}"
    assert len(set(ds.ids)) == N


@pytest.mark.parametrize("layout", ["folder", "parquet", "jsonl"])
def test_load_from_s3_equals_local(synth, s3_bucket, tmp_path, layout):
    upload_dir(synth["parquet"].parent, f"s3://{s3_bucket}/sets/pq")
    upload_dir(synth["jsonl"].parent, f"s3://{s3_bucket}/sets/js")
    uri, local = {
        "folder": (f"s3://{s3_bucket}/sets/js", synth["jsonl"]),
        "parquet": (f"s3://{s3_bucket}/sets/pq/{synth['parquet'].name}", synth["parquet"]),
        "jsonl": (f"s3://{s3_bucket}/sets/js/{synth['jsonl'].name}", synth["jsonl"]),
    }[layout]
    cache = tmp_path / "cache"
    remote = MotionEditDataset.from_source(uri, cache_dir=str(cache), on_error="raise")
    _assert_same(MotionEditDataset.from_source(local, on_error="raise"), remote)
    assert (cache / s3_bucket / "sets").is_dir()


def test_s3_errors_name_the_uri_and_file(synth, s3_bucket, tmp_path):
    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    (manifest.parent / "images" / f"synth-{SEED}-000002_target.png").unlink()
    upload_dir(manifest.parent, f"s3://{s3_bucket}/bad")
    with pytest.raises(DataError) as err:
        MotionEditDataset.from_source(f"s3://{s3_bucket}/bad", cache_dir=tmp_path / "cache", on_error="raise")
    assert f"s3://{s3_bucket}/bad/metadata.jsonl line 3" in str(err.value)
    assert f"s3://{s3_bucket}/bad/images/synth-{SEED}-000002_target.png" in str(err.value)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/missing"):
        MotionEditDataset.from_source(f"s3://{s3_bucket}/missing", cache_dir=tmp_path / "cache", on_error="raise")


# ----------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_and_id_stable(synth):
    ds = MotionEditDataset.from_source(synth["parquet"], on_error="raise")
    train, evaluation = ds.split(0.4, seed=7)
    again = ds.split(0.4, seed=7)
    assert (train.ids, evaluation.ids) == (again[0].ids, again[1].ids)
    assert sorted(train.ids + evaluation.ids) == sorted(ds.ids) and not set(train.ids) & set(evaluation.ids)
    # The side of an id is a function of (seed, id) alone: the rule below, and unchanged in a subset.
    for i in ds.ids:
        u = int.from_bytes(hashlib.sha256(f"7:{i}".encode()).digest()[:8], "big") / 2.0**64
        assert (i in evaluation.ids) == (u < 0.4)
    sub_train, sub_eval = ds[2:].split(0.4, seed=7)
    assert set(sub_eval.ids) == set(evaluation.ids) - set(ds.ids[:2])
    other = ds.split(0.4, seed=8)
    assert other[1].ids != evaluation.ids
    with pytest.raises(ValueError, match="eval_fraction"):
        ds.split(1.0, seed=0)


# ------------------------------------------------------------------------------------------ validation


def _break_jsonl(manifest: Path, defect: str) -> tuple[int, str, str]:
    """Damage one row of a copied synthetic JSONL set; returns (line number, id, text the message must have)."""
    lines = manifest.read_text().splitlines()
    line_no = 3
    row = json.loads(lines[line_no - 1])
    row_id = row["id"]
    if defect == "missing_field":
        del row["prompt"]
        expected = "missing field 'prompt'"
    elif defect == "missing_image":
        (manifest.parent / row["image"][1]).unlink()
        expected = f"missing image file {manifest.parent / row['image'][1]}"
    elif defect == "truncated_png":
        png = manifest.parent / row["image"][0]
        data = png.read_bytes()
        png.write_bytes(data[: len(data) // 2])
        expected = f"cannot decode input image {png}"
    elif defect == "unknown_category":
        row["category"] = "Teleportation"
        expected = "unknown category 'Teleportation'"
    lines[line_no - 1] = json.dumps(row)
    manifest.write_text("\n".join(lines) + "\n")
    return line_no, row_id, expected


DEFECTS = ["missing_field", "missing_image", "truncated_png", "unknown_category"]


@pytest.mark.parametrize("defect", DEFECTS)
def test_bad_jsonl_row_raises_with_file_row_and_id(synth, tmp_path, defect):
    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    line_no, row_id, expected = _break_jsonl(manifest, defect)
    with pytest.raises(DataError) as err:
        MotionEditDataset.from_source(manifest, on_error="raise")
    message = str(err.value)
    assert message.startswith(f"{manifest} line {line_no} (id='{row_id}'): ")
    assert expected in message


@pytest.mark.parametrize("defect", DEFECTS)
def test_bad_jsonl_row_is_skipped_and_recorded(synth, tmp_path, defect, caplog):
    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    line_no, row_id, expected = _break_jsonl(manifest, defect)
    with caplog.at_level(logging.WARNING, logger="motionnft_core.data.motionedit"):
        ds = MotionEditDataset.from_source(manifest, on_error="skip")
    assert len(ds) == N - 1 and row_id not in ds.ids
    assert len(ds.skipped) == 1
    where, reason = ds.skipped[0]
    assert (where.source, where.row, where.id) == (str(manifest), line_no, row_id)
    assert expected in reason
    assert f"{manifest} line {line_no}" in caplog.text and "skipped 1 of 12 rows" in caplog.text


def _damaged_parquet(src: Path, dest: Path) -> Path:
    """Row 1: prompt removed; row 4: input PNG truncated; everything else intact."""
    table = pq.read_table(src)
    rows = table.to_pylist()
    rows[1]["prompt"] = None
    data = rows[4]["input_image"]["bytes"]
    rows[4]["input_image"] = {"bytes": data[: len(data) // 2], "path": rows[4]["input_image"]["path"]}
    out = dest / "damaged.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    return out


def test_bad_parquet_rows_raise_or_skip(synth, tmp_path, caplog):
    damaged = _damaged_parquet(synth["parquet"], tmp_path)
    with pytest.raises(DataError) as err:
        MotionEditDataset.from_source(damaged, on_error="raise")
    assert str(err.value).startswith(f"{damaged} row 1 (id='synth-{SEED}-000001'): missing field 'prompt'")
    assert "and 1 more bad rows" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="motionnft_core.data.motionedit"):
        ds = MotionEditDataset.from_source(damaged, on_error="skip")
    assert len(ds) == N - 2
    assert [(w.row, w.id) for w, _ in ds.skipped] == [(1, f"synth-{SEED}-000001"), (4, f"synth-{SEED}-000004")]
    assert "cannot decode input image (embedded bytes)" in ds.skipped[1][1]
    assert "skipped 2 of 12 rows" in caplog.text


def test_missing_parquet_column_and_all_rows_bad(synth, tmp_path):
    table = pq.read_table(synth["parquet"]).drop_columns(["prompt"])
    pq.write_table(table, tmp_path / "noprompt.parquet")
    with pytest.raises(DataError, match=r"noprompt.parquet: missing column\(s\) \['prompt'\]"):
        MotionEditDataset.from_source(tmp_path / "noprompt.parquet", on_error="skip")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "move it", "image": ["a.png", "b.png"]}) + "\n")
    with pytest.raises(DataError, match="no usable rows"):
        MotionEditDataset.from_source(tmp_path / "empty.jsonl", on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        MotionEditDataset.from_source(tmp_path / "empty.jsonl", on_error="ignore")


# -------------------------------------------------------------------------------------------- resizing


def _ramp_example(root: Path, height: int, width: int) -> None:
    """One example whose every channel is the horizontal ramp v(x) = 4x (x = column index)."""
    ramp = np.broadcast_to((4 * np.arange(width, dtype=np.uint8))[None, :, None], (height, width, 3))
    folder = root / "ramp"
    folder.mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(ramp)).save(folder / "input.png")
    Image.fromarray(np.ascontiguousarray(255 - ramp)).save(folder / "target.png")
    (folder / "meta.json").write_text(json.dumps({"prompt": "nothing moves", "category": "Pose/Posture"}))


@pytest.mark.parametrize(
    ("resolution", "crop_left"),
    [((32, 32), 0), ((32, 16), 16)],  # (32, 16): aspect 2:1, so the centre 32 of 64 columns are kept
)
def test_resolution_crops_to_aspect_and_resizes_bilinear(tmp_path, resolution, crop_left):
    _ramp_example(tmp_path, 64, 64)
    ex = MotionEditDataset.from_source(tmp_path, resolution=resolution, on_error="raise")[0]
    assert ex.input_image.shape == ex.target_image.shape == (3, *resolution)
    # Output column j covers input columns crop_left + [2j, 2j + 2); its centre is at continuous position
    # crop_left + 2j + 1, where the ramp (pixel x has centre x + 0.5) reads 4 * (crop_left + 2j + 0.5).
    # A symmetric filter reproduces a linear ramp exactly away from the borders.
    j = np.arange(1, resolution[1] - 1)
    expected = 4 * (crop_left + 2 * j + 0.5)
    got = ex.input_image[0, 5, 1:-1].numpy().astype(float)
    assert np.abs(got - expected).max() <= 1.0
    assert np.abs(ex.target_image[0, 5, 1:-1].numpy() - (255 - expected)).max() <= 1.0


def test_native_size_keeps_images_and_checks_pairs(tmp_path):
    _ramp_example(tmp_path, 24, 40)
    ex = MotionEditDataset.from_source(tmp_path, on_error="raise")[0]
    assert ex.input_image.shape == (3, 24, 40)
    assert torch.equal(ex.input_image[1, 7], 4 * torch.arange(40, dtype=torch.uint8))
    Image.new("RGB", (40, 20)).save(tmp_path / "ramp" / "target.png")
    with pytest.raises(DataError, match="input image is 40x24 but target image is 40x20"):
        MotionEditDataset.from_source(tmp_path, on_error="raise")
    assert len(MotionEditDataset.from_source(tmp_path, resolution=(16, 16), on_error="raise")) == 1


# ------------------------------------------------------------------------------------------- image modes


def _mode_set(root: Path, images: dict[str, Image.Image]) -> Path:
    """A JSONL set whose row ``name`` has ``images[name]`` (saved as a real file) as input, a black target."""
    root.mkdir(parents=True)
    rows = []
    for name, img in images.items():
        suffix = ".tif" if img.mode == "CMYK" else ".png"  # PNG has no CMYK; TIFF stores it losslessly
        img.save(root / f"{name}{suffix}")
        Image.new("RGB", img.size).save(root / f"{name}_target.png")
        rows.append({"id": name, "prompt": "nothing moves", "image": [f"{name}{suffix}", f"{name}_target.png"]})
    manifest = root / "metadata.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def _hwc(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy().astype(int)


def test_every_image_mode_loads_as_8bit_rgb(tmp_path):
    x = np.arange(256)
    gray16 = np.stack([257 * x, 256 * x + 255]).astype(np.uint16)  # both rows read x: v >> 8
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 128, 0, 0, 0, 255, 10, 20, 30])
    palette.putdata([0, 1, 2, 3])
    palette.info["transparency"] = bytes([255, 128, 255, 0])  # index 1 half transparent, index 3 invisible
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 255), (100, 0), (200, 51)])
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(10, 20, 30, 255), (10, 20, 30, 0), (100, 50, 0, 128)])
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(100, 50, 0, 60), (0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)])
    images = {
        "gray16": Image.fromarray(gray16),
        "palette": palette,
        "la": la,
        "rgba": rgba,
        "l": Image.fromarray(np.array([[7, 250]], dtype=np.uint8)),
        "cmyk": cmyk,
    }
    assert images["gray16"].mode == "I;16"
    ds = MotionEditDataset.from_source(_mode_set(tmp_path / "modes", images), on_error="raise")
    got = {ex.id: _hwc(ex.input_image) for ex in ds}

    assert got["gray16"].shape == (2, 256, 3)
    assert (got["gray16"] == x[None, :, None]).all()  # 16-bit scaled to 8 bit, not clipped to white
    assert (got["gray16"] < 255).mean() > 0.99
    # Alpha over white: c' = round(c * a / 255 + 255 * (1 - a / 255)).
    # Palette: red opaque; green (0, 128, 0) at a = 128 -> (127, 191.25, 127); blue opaque; index 3 invisible.
    assert got["palette"].tolist() == [[[255, 0, 0], [127, 191, 127]], [[0, 0, 255], [255, 255, 255]]]
    # LA: opaque 100; invisible -> white; 200 at a = 51 (0.2) -> 40 + 204 = 244.
    assert got["la"].tolist() == [[[100] * 3, [255] * 3, [244] * 3]]
    # RGBA: (100, 50, 0) at a = 128 -> (50.2 + 127, 25.1 + 127, 127).
    assert got["rgba"].tolist() == [[[10, 20, 30], [255, 255, 255], [177, 152, 127]]]
    assert got["l"].tolist() == [[[7] * 3, [250] * 3]]
    # CMYK, naive: R = round((255 - C) * (255 - K) / 255): (155 * 195, 205 * 195, 255 * 195) / 255.
    assert got["cmyk"].tolist() == [[[119, 157, 195], [255, 255, 255], [0, 0, 0], [0, 255, 255]]]


def test_to_rgb_uint8_other_16bit_modes_pa_and_unsupported():
    values = np.array([[0, 255, 256, 0x1234], [0x8080, 40000, 0xFF00, 65535]])
    expected = [[0, 0, 1, 0x12], [0x80, 156, 255, 255]]
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")):
        img = Image.frombytes(mode, (4, 2), values.astype(dtype).tobytes())
        out = to_rgb_uint8(img)
        assert out.shape == (3, 2, 4) and out.dtype == torch.uint8
        assert (out == torch.tensor(expected, dtype=torch.uint8)).all(), mode
    as_i = to_rgb_uint8(Image.fromarray(np.array([[-5, 70000, 0x1234]], dtype=np.int32)))  # mode I, clamped
    assert as_i[:, 0].tolist() == [[0, 255, 0x12]] * 3
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0, 200, 100, 50])
    pa.putdata([(1, 255), (1, 0)])
    assert _hwc(to_rgb_uint8(pa)).tolist() == [[[200, 100, 50], [255, 255, 255]]]
    with pytest.raises(ValueError, match="unsupported image mode 'F'"):
        to_rgb_uint8(Image.new("F", (2, 2)))


# ------------------------------------------------------------------------------------ images too small


def _shrink_row(manifest: Path, line_no: int = 3) -> str:
    """Replace the input image of one JSONL row by a 3x2 solid (10, 200, 30) PNG; returns the row's id."""
    row = json.loads(manifest.read_text().splitlines()[line_no - 1])
    Image.new("RGB", (3, 2), (10, 200, 30)).save(manifest.parent / row["image"][0])
    return row["id"]


def test_image_smaller_than_resolution_is_a_bad_row(synth, tmp_path, caplog):
    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    row_id = _shrink_row(manifest)
    with pytest.raises(DataError) as err:
        MotionEditDataset.from_source(manifest, resolution=(SIZE, SIZE), on_error="raise")
    assert str(err.value).startswith(
        f"{manifest} line 3 (id='{row_id}'): input image is 3x2, smaller than the resolution 64x64 (WxH)"
    )
    assert "upscale_small" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="motionnft_core.data.motionedit"):
        ds = MotionEditDataset.from_source(manifest, resolution=(SIZE, SIZE), on_error="skip")
    assert len(ds) == N - 1 and row_id not in ds.ids and ds.upscaled == 0
    assert [(w.row, w.id) for w, _ in ds.skipped] == [(3, row_id)]
    assert "skipped 1 of 12 rows" in caplog.text and f"{manifest} line 3" in caplog.text
    assert "upscaled" not in caplog.text
    # Either side counts: the 64x64 images are narrower than 128 columns.
    with pytest.raises(DataError, match=r"line 1 .*input image is 64x64, smaller than the resolution 128x32"):
        MotionEditDataset.from_source(synth["jsonl"], resolution=(32, 128), on_error="raise")
    not_smaller = MotionEditDataset.from_source(synth["jsonl"], resolution=(32, 64), on_error="raise")
    assert len(not_smaller) == N  # kept


def test_upscale_small_loads_at_the_resolution_and_counts(synth, tmp_path, caplog):
    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    row_id = _shrink_row(manifest)
    with caplog.at_level(logging.WARNING, logger="motionnft_core.data.motionedit"):
        ds = MotionEditDataset.from_source(manifest, resolution=(SIZE, SIZE), upscale_small=True, on_error="raise")
    assert len(ds) == N and ds.skipped == [] and ds.upscaled == 1 and "upscaled=1" in repr(ds)
    ex = ds[ds.ids.index(row_id)]
    assert ex.input_image.shape == ex.target_image.shape == (3, SIZE, SIZE)
    assert (_hwc(ex.input_image) == [10, 200, 30]).all()
    assert caplog.text.count("upscaled") == 1
    assert f"upscaled 1 images (in 1 of 12 rows) of {manifest}: smaller than the resolution 64x64" in caplog.text


def test_load_splits_passes_upscale_small(synth, tmp_path):
    from motionnft_core.config_loader import load_config

    manifest = _copy_jsonl_set(synth, tmp_path / "set")
    row_id = _shrink_row(manifest)
    base = ["model.tiny=true", "reward.judge.tiny=true", f"model.cache_dir={tmp_path / 'cache'}",
            "rollout.height=64", "rollout.width=64", "data.eval_fraction=0", "data.on_error=raise"]  # fmt: skip
    with pytest.raises(DataError, match=f"line 3 \\(id='{row_id}'\\): input image is 3x2"):
        load_splits(load_config(None, [*base, f"data.source={manifest}"]))
    train, held = load_splits(load_config(None, [*base, f"data.source={manifest}", "data.upscale_small=true"]))
    assert len(train) == N and len(held) == 0 and train.upscaled == 1
    # Generated synthetic images below the resolution are always upscaled (both images of every row).
    train, _ = load_splits(load_config(None, [*base, "data.synthetic=3", "data.synthetic_size=32"]))
    assert len(train) == 3 and train.upscaled == 6 and train[0].input_image.shape == (3, 64, 64)
