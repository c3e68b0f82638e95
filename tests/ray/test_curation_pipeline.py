"""The curation pipeline on Ray Data (the session's shared cluster) over the five sample videos, H.264 written by
PyAV (curation/samples.py): objects moving (kept), a camera pan (dropped as camera motion), a still shot (dropped),
a scene cut (the clip starts at the cut), a corrupt file (named and skipped). Precision and recall of the kept set
against the known truth are 1.0; a run that stopped part way continues with the videos it had not committed. The
tiny random judge and random RAFT weights in the actors: the wiring and accounting (their verdicts mean nothing)."""

from __future__ import annotations

import json
import math

import pytest

from curation.config import load_curate_config
from curation.output import committed_keys, read_manifest
from curation.pipeline import run_curation
from curation.samples import TRUTH, write_samples
from motionnft_core.data.motionedit import MotionEditDataset

CPU = ["flow.estimator=dis", "flow.gpus=0", "flow.batch_size=4", "judge.gpus=0", "judge.cpus=0.5",
       "cluster.decode_cpus=0.5", "clips.height=64", "clips.width=64", "input.min_side=32"]  # fmt: skip


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    write_samples(out)
    return out


def _cfg(videos, out, *extra):
    return load_curate_config(None, [f"input.videos={videos}", f"output.dir={out}", *CPU, *extra])


def _kept(rows) -> set[tuple[str, float]]:
    return {(r["video"].rsplit("/", 1)[-1], r["start_s"]) for r in rows
            if r["kind"] == "pair" and r["status"] == "kept"}  # fmt: skip


def test_the_five_cases_precision_recall_and_resume(videos, tmp_path, ray_cluster):
    cfg = _cfg(videos, tmp_path, "judge.scripted=tests.curation_judge:PassingJudge", "output.eval_fraction=0.5")
    lines: list[str] = []
    summary = run_curation(cfg, log=lines.append)
    rows = read_manifest(tmp_path)
    truth = {(name, start) for name, case in TRUTH.items() if case for start in case[0]}
    kept = _kept(rows)
    hits = len(kept & truth)
    precision, recall = hits / max(1, len(kept)), hits / len(truth)
    print(f"curation on the five cases: precision {precision:.2f}, recall {recall:.2f} (kept {sorted(kept)})")
    assert precision == 1.0 and recall == 1.0
    by_video = {r["video"].rsplit("/", 1)[-1]: r for r in rows if r["kind"] == "video"}
    assert by_video["corrupt.mp4"]["status"] == "bad" and "corrupt.mp4" in "\n".join(lines)
    assert list(summary["bad_videos"]) == [str(videos / "corrupt.mp4")]
    reasons = {(r["video"].rsplit("/", 1)[-1], r["start_s"]): r["reason"] for r in rows if r["kind"] == "pair"}
    assert reasons[("pan.mp4", 0.0)] == "camera_motion" and reasons[("still.mp4", 0.0)] == "static"
    assert reasons[("still.mp4", 3.0)].startswith("near_duplicate of")
    cut = by_video["cut.mp4"]["info"]
    assert cut["shots"] == 2 and cut["shot_starts_s"] == [0.0, 2.0]  # the only clip starts at the cut
    for r in rows:
        if r["kind"] == "pair":
            assert not (r["start_s"] < 2.0 < r["end_s"] and r["video"].endswith("cut.mp4")), "a clip crosses the cut"
            assert not math.isnan(r["motion"] if r["motion"] is not None else math.nan) or r["stage"] == "a"
    data = MotionEditDataset.from_source(str(tmp_path / "dataset"), on_error="raise", resolution=(64, 64))
    assert sorted(data.ids) == sorted(r["pair_id"] for r in rows if r["status"] == "kept")
    assert {data[i].category for i in range(len(data))} == {"Locomotion/Distance"}
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["summary"]["kept"] == summary["kept"] and len(run["prompt_digest"]) == 12

    # A crash after three videos: the fourth and fifth were never committed. The rerun curates only those.
    work = tmp_path / "work"
    lost = sorted(committed_keys(tmp_path))[-2:]
    for key in lost:
        (work / f"{key}.jsonl").unlink()
        (work / f"{key}.parquet").unlink(missing_ok=True)
    lines.clear()
    again = run_curation(cfg, log=lines.append)
    assert "3 already committed, 2 to curate" in lines[0]
    assert committed_keys(tmp_path) == {r["video_key"] for r in rows if r["kind"] == "video"}
    assert _kept(read_manifest(tmp_path)) == kept and again["kept"] == summary["kept"]
    lines.clear()
    run_curation(cfg, log=lines.append)
    assert "5 already committed, 0 to curate" in lines[0]


@pytest.mark.slow  # a vLLM server of its own: about a minute on 2 cores
def test_the_tiny_judge_and_random_raft_in_the_actors(videos, tmp_path, ray_cluster):
    """The served tiny judge answers every call of stage c (criteria, summary, rewrite, category) or the pair is
    unverified; every candidate is accounted for."""
    cfg = _cfg(videos, tmp_path / "out", "judge.tiny=true", "judge.max_model_len=2048", "judge.max_tokens=8",
               "judge.pass_digit=0", "judge.retry_budget_s=30", "flow.estimator=raft_small", "flow.num_updates=1",
               "filter.min_motion=0", "filter.max_camera_share=1", "filter.max_motion=1e9",
               "filter.min_object_motion=0", "input.limit=3", f"input.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    summary = run_curation(cfg, log=print)
    pairs = [r for r in read_manifest(tmp_path / "out") if r["kind"] == "pair"]
    judged = [r for r in pairs if r["stage"] != "a"]  # a near-duplicate never reaches the judge
    assert judged and all(r["status"] in ("kept", "unverified") for r in judged)
    for r in judged:
        assert r["judge_attempts"] >= 4 and all(r[c] is not None for c in ("setting_consistency", "visual_quality"))
        if r["status"] == "kept":
            assert r["instruction"] and r["category"] and r["summary"]
    assert summary["unverified"] == sum(r["status"] == "unverified" for r in pairs)
    assert sum(summary["kept"].values()) == sum(r["status"] == "kept" for r in pairs)
