"""Stage d: what a curation run writes, and resuming it.

While the pipeline runs, each video is committed on its own once all its rows have arrived (`Committer`):
`work/<video key>.parquet` (its kept pairs, in the training format) is written first, then
`work/<video key>.jsonl` (its manifest rows): each through a temporary file renamed into place, so a crash leaves a
video either committed or absent, and a rerun skips exactly the committed videos (`committed_keys`).

At the end (`finalize`), in video path order (deterministic on resume): the global near-duplicate pass (when
`filter.dedup_scope` is global), then

- `dataset/train.parquet`, `dataset/eval.parquet`: the MotionEdit hub parquet the trainer reads (motionnft_core/
  data/motionedit.py: `id`, `prompt`, `input_image` / `target_image` as `{bytes: PNG, path}`, `category`), plus
  `split`, `source_video`, `video_sha256`, `start_s`, `end_s`; train with `data.source=<dir>/dataset
  data.split_column=split` so the split stays by video;
- `manifest.jsonl`: one row per video and per pair (source video, times, every stage's scores, the drop reason);
- `summary.json` and `summary.txt` (the table of what each stage kept and dropped), `pairs.png` (a few kept and
  dropped pairs with the reason), `run.json` (config, prompt digest, code version, times).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from curation import prompts
from curation.clips import split_of
from curation.config import CurateConfig
from curation.dedup import NearDuplicates
from curation.rows import CRITERIA, MOTION, image
from motionnft_core.config_loader import config_to_dict

WORK, DATASET = "work", "dataset"
PREVIEWS_PER_REASON = 2  # pairs per (video, outcome) whose small picture is kept for pairs.png
PREVIEW_HEIGHT = 64
MANIFEST_DROPPED = ("input_rgb", "target_rgb")  # never in the manifest

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("input_image", _IMAGE), ("target_image", _IMAGE),
     ("category", pa.string()), ("split", pa.string()), ("source_video", pa.string()), ("video_sha256", pa.string()),
     ("start_s", pa.float64()), ("end_s", pa.float64())],
    metadata={b"huggingface": json.dumps({"info": {"features": {
        "id": {"_type": "Value", "dtype": "string"}, "prompt": {"_type": "Value", "dtype": "string"},
        "input_image": {"_type": "Image"}, "target_image": {"_type": "Image"},
        "category": {"_type": "Value", "dtype": "string"}, "split": {"_type": "Value", "dtype": "string"},
        "source_video": {"_type": "Value", "dtype": "string"}, "video_sha256": {"_type": "Value", "dtype": "string"},
        "start_s": {"_type": "Value", "dtype": "float64"}, "end_s": {"_type": "Value", "dtype": "float64"},
    }}}).encode()},
)  # fmt: skip


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """JSON-safe: NaN becomes null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def reason_kind(reason: str) -> str:
    """The kind of a drop reason, for counting: `near_duplicate of x` -> `near_duplicate`, `bad video: ...` ->
    `bad_video`, `judge: a, b` -> `judge`."""
    if reason.startswith("bad video"):
        return "bad_video"
    return reason.split(":")[0].split(" ")[0] or "?"


def committed_keys(out_dir: str | Path) -> set[str]:
    """Keys of the videos a previous run committed (their manifest file exists)."""
    work = Path(out_dir) / WORK
    return {p.stem for p in work.glob("*.jsonl")} if work.is_dir() else set()


class Committer:
    """Collects the pipeline's rows by video and commits each video as soon as all its rows are in."""

    def __init__(self, cfg: CurateConfig, total_videos: int, already: int = 0, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.work = Path(cfg.output.dir) / WORK
        self.work.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.total, self.done, self.log = total_videos, already, log
        self.began = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        row = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}  # Ray Data's numpy scalars
        rows = self.pending[row["video_key"]]
        rows.append(row)
        if len(rows) == int(row["video_rows"]):
            self.commit(self.pending.pop(row["video_key"]))

    def commit(self, rows: list[dict[str, Any]]) -> None:
        rows = sorted(rows, key=lambda r: (r["kind"] != "video", r["start_s"] if r["kind"] == "pair" else 0.0))
        video = rows[0]
        key = video["video_key"]
        sha = video["video_sha256"]
        split = split_of(sha, self.cfg.output.eval_fraction, self.cfg.output.seed) if sha else ""
        kept = [r for r in rows if r["kind"] == "pair" and r["status"] == "kept"]
        if kept:
            table = pa.Table.from_pylist([self._dataset_row(r, split) for r in kept], schema=SCHEMA)
            _atomic(self.work / f"{key}.parquet", lambda p: pq.write_table(table, p))
        else:
            (self.work / f"{key}.parquet").unlink(missing_ok=True)
        previews: Counter[str] = Counter()
        lines = []
        for row in rows:
            entry = {k: _plain(v) for k, v in row.items() if k not in MANIFEST_DROPPED}
            entry["info"] = json.loads(row["info"]) if row["info"] else None
            if row["kind"] == "pair":
                entry["split"] = split
                outcome = row["status"] + ":" + reason_kind(row["reason"])
                previews[outcome] += 1
                if previews[outcome] <= PREVIEWS_PER_REASON:
                    entry["preview"] = base64.b64encode(_png(_side_by_side(row))).decode("ascii")
            lines.append(json.dumps(entry))
        _atomic(self.work / f"{key}.jsonl", lambda p: p.write_text("\n".join(lines) + "\n"))
        self.done += 1
        counts = Counter(r["status"] for r in rows if r["kind"] == "pair")
        what = video["reason"] if video["status"] == "bad" else ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        self.log(f"[curate] {self.done}/{self.total} videos ({time.monotonic() - self.began:.1f} s): "
                 f"{video['video']}: {what or 'no clip'}")  # fmt: skip

    @staticmethod
    def _dataset_row(row: dict[str, Any], split: str) -> dict[str, Any]:
        pid = row["pair_id"]
        return {
            "id": pid, "prompt": row["instruction"],
            "input_image": {"bytes": _png(image(row, "input")), "path": f"{pid}_input.png"},
            "target_image": {"bytes": _png(image(row, "target")), "path": f"{pid}_target.png"},
            "category": row["category"] or None, "split": split, "source_video": row["video"],
            "video_sha256": row["video_sha256"], "start_s": row["start_s"], "end_s": row["end_s"],
        }  # fmt: skip


def _side_by_side(row: dict[str, Any]) -> np.ndarray:
    pair = np.concatenate([image(row, "input"), image(row, "target")], axis=1)
    h, w = pair.shape[:2]
    scale = PREVIEW_HEIGHT / h
    return np.asarray(Image.fromarray(pair).resize((max(1, round(w * scale)), PREVIEW_HEIGHT)))


# ------------------------------------------------------------------------------------------------ the end of a run


def read_manifest(out_dir: Path) -> list[dict[str, Any]]:
    """Every committed row, in video key order, each video's rows in time order."""
    rows = []
    for path in sorted((out_dir / WORK).glob("*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return rows


def global_duplicates(rows: list[dict[str, Any]], max_distance: int) -> dict[str, str]:
    """{pair id: the earlier kept pair it duplicates} over the kept pairs of all videos, in manifest order."""
    seen = NearDuplicates(max_distance)
    found = {}
    for row in rows:
        if row["kind"] == "pair" and row["status"] == "kept":
            earlier = seen.check(row["pair_id"], row["input_hash"], row["target_hash"])
            if earlier is not None:
                found[row["pair_id"]] = earlier
    return found


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of what each stage kept and dropped (videos for the file checks, pairs after), and the bad videos."""
    videos = [r for r in rows if r["kind"] == "video"]
    pairs = [r for r in rows if r["kind"] == "pair"]
    bad = [r for r in videos if r["status"] == "bad"]
    out: dict[str, Any] = {
        "videos": len(videos), "bad_videos": {r["video"]: r["reason"] for r in bad}, "pairs": len(pairs),
        "stages": [], "kept": {"train": 0, "eval": 0}, "unverified": 0,
    }  # fmt: skip
    out["stages"].append({"stage": "a. decodable, long, large enough (videos)", "in": len(videos),
                          "kept": len(videos) - len(bad), "dropped": len(bad),
                          "reasons": dict(Counter(reason_kind(r["reason"]) for r in bad))})  # fmt: skip
    remaining = pairs
    for stage, title in (("a", "a. near-duplicate, near-static (pairs)"), ("b", "b. camera vs object motion"),
                         ("c", "c. MLLM check")):  # fmt: skip
        dropped = [r for r in remaining if r["stage"] == stage]
        reasons = Counter("unverified" if r["status"] == "unverified" else reason_kind(r["reason"]) for r in dropped)
        out["stages"].append({"stage": title, "in": len(remaining), "kept": len(remaining) - len(dropped),
                              "dropped": len(dropped), "reasons": dict(reasons)})  # fmt: skip
        remaining = [r for r in remaining if r["stage"] != stage]
    for r in remaining:
        out["kept"][r["split"] or "train"] += 1
    out["unverified"] = sum(r["status"] == "unverified" for r in pairs)
    out["judge_attempts"] = sum(int(r.get("judge_attempts") or 0) for r in pairs)
    return out


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'stage':44} {'in':>6} {'kept':>6} {'dropped':>8}  reasons"]
    for s in summary["stages"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items()))
        lines.append(f"{s['stage']:44} {s['in']:6d} {s['kept']:6d} {s['dropped']:8d}  {reasons}")
    k = summary["kept"]
    lines.append(f"{'d. output (pairs)':44} {'':6} {k['train'] + k['eval']:6d} {'':8}  train {k['train']}, "
                 f"eval {k['eval']}; unverified (manifest only) {summary['unverified']}")  # fmt: skip
    for video, reason in summary["bad_videos"].items():
        lines.append(f"bad video {video}: {reason.removeprefix('bad video: ')}")
    return "\n".join(lines)


def picture(rows: list[dict[str, Any]], n: int, path: Path) -> None:
    """Up to `n` kept and `n` dropped pairs (input | target), each labelled with its outcome, in one PNG."""
    kept = [r for r in rows if r.get("preview") and r["status"] == "kept"][:n]
    by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("preview") and r["status"] != "kept":
            by_reason[r["status"] + ":" + reason_kind(r["reason"])].append(r)
    dropped: list[dict[str, Any]] = []
    while len(dropped) < n and any(by_reason.values()):  # round robin over the reasons
        for group in by_reason.values():
            if group and len(dropped) < n:
                dropped.append(group.pop(0))
    tiles = []
    for r in kept + dropped:
        pair = Image.open(io.BytesIO(base64.b64decode(r["preview"]))).convert("RGB")
        label = "kept" if r["status"] == "kept" else f"{r['status']}: {r['reason'][:40]}"
        tile = Image.new("RGB", (max(pair.width, 260), pair.height + 14), "white")
        tile.paste(pair, (0, 14))
        ImageDraw.Draw(tile).text((2, 1), f"{label} ({Path(r['video']).name} {r['start_s']:.1f}s)"[:60], fill="black")
        tiles.append(tile)
    if not tiles:
        tiles.append(Image.new("RGB", (260, 14), "white"))
    sheet = Image.new("RGB", (max(t.width for t in tiles), sum(t.height + 2 for t in tiles)), "white")
    y = 0
    for tile in tiles:
        sheet.paste(tile, (0, y))
        y += tile.height + 2
    _atomic(path, lambda p: sheet.save(p, format="PNG"))


def code_version() -> str:
    """The git commit of the code (with `+dirty` for local changes), or the package version outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"motionnft {version('motionnft')}"
        except PackageNotFoundError:
            return "unknown"


def finalize(cfg: CurateConfig, started: float) -> dict[str, Any]:
    """The run's outputs from its committed videos (module docstring); returns the summary."""
    out = Path(cfg.output.dir)
    rows = read_manifest(out)
    duplicates = global_duplicates(rows, cfg.filter.dedup_distance) if cfg.filter.dedup_scope == "global" else {}
    for row in rows:
        if row.get("pair_id") in duplicates:
            row.update(status="dropped", stage="a", reason=f"near_duplicate (global) of {duplicates[row['pair_id']]}")
    dataset = out / DATASET
    dataset.mkdir(parents=True, exist_ok=True)
    shards = sorted((out / WORK).glob("*.parquet"))
    tables = [pq.read_table(p, schema=SCHEMA) for p in shards]
    merged = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    if duplicates:
        keep = pa.array([i not in duplicates for i in merged.column("id").to_pylist()])
        merged = merged.filter(keep)
    for split in ("train", "eval"):
        part = merged.filter(pc.equal(merged.column("split"), split)) if merged.num_rows else merged
        target = dataset / f"{split}.parquet"
        if part.num_rows:
            _atomic(target, lambda p, t=part: pq.write_table(t, p))
        else:
            target.unlink(missing_ok=True)
    _atomic(out / "manifest.jsonl", lambda p: p.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "preview"}) + "\n" for r in rows)))  # fmt: skip
    summary = summarize(rows)
    text = table(summary)
    _atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    _atomic(out / "summary.txt", lambda p: p.write_text(text + "\n"))
    picture(rows, cfg.output.preview_pairs, out / "pairs.png")
    run = {"config": config_to_dict(cfg), "prompt_digest": prompts.prompt_digest(), "code_version": code_version(),
           "started": started, "finished": time.time(), "criteria": list(CRITERIA), "motion": list(MOTION),
           "summary": summary}  # fmt: skip
    _atomic(out / "run.json", lambda p: p.write_text(json.dumps(run, indent=2) + "\n"))
    return summary
