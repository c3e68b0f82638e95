"""The curation's pure logic: shot detection on synthetic frames, clip cutting (stride, overlap, cuts), pair ids and
the split by video, near-duplicates, the stage a/b thresholds, the judge's decision logic (scripted judge), bad
videos, the per-video commits and resume, the summary, the config's errors, and the trainer's split by column.
The Ray Data pipeline on the five sample videos: tests/ray/test_curation_pipeline.py."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from curation import prompts
from curation.clips import ClipCutter, cut_clips, pair_id, split_of
from curation.config import ClipConfig, ConfigError, CurateConfig, FilterConfig, ShotConfig, load_curate_config
from curation.dedup import NearDuplicates, distance, phash
from curation.output import Committer, committed_keys, finalize, read_manifest, reason_kind, summarize
from curation.rows import CRITERIA, new_row
from curation.samples import texture, write_video
from curation.shots import cut_scores, detect_shots, signature
from curation.stage_flow import decide, motion_measures
from curation.stage_judge import judge_pair
from curation.video import BadVideo, decode
from motionnft_core.config import FlowEstimatorConfig, JudgeConfig
from motionnft_core.data.motionedit import DataError, MotionEditDataset
from rewards.flow_model import ClassicalFlow, build_flow_estimator
from tests.curation_judge import INSTRUCTION, ScriptedJudge

SHOTS = ShotConfig()


def _scene(seed: int, n: int, shift: int = 0, side: int = 64) -> list[np.ndarray]:
    """n frames of one textured scene, moving `shift` pixels right per frame (np.roll)."""
    base = texture(side, side, seed)
    return [np.roll(base, i * shift, axis=1) for i in range(n)]


# ---- shots and clips ------------------------------------------------------------------------------------------


def test_shot_detection_finds_hard_cuts_and_ignores_motion():
    frames = _scene(0, 10, shift=1) + _scene(1, 8, shift=2) + [(f * 0.6).astype(np.uint8) for f in _scene(2, 6)]
    assert detect_shots(frames, SHOTS) == [0, 10, 18]


def test_cut_scores_are_zero_for_equal_frames_and_one_for_disjoint_colours():
    black, white = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)
    assert cut_scores(signature(black), signature(black)) == (0.0, 0.0)
    assert cut_scores(signature(black), signature(white)) == (1.0, 1.0)


def _times(n: int, fps: float) -> list[float]:
    return [i / fps for i in range(n)]


@pytest.mark.parametrize(("stride", "expected"), [(3.0, [(0, 3), (3, 6)]), (1.5, [(0, 3), (1.5, 4.5), (3, 6)]),
                                                  (4.0, [(0, 3)])])  # fmt: skip
def test_clips_follow_stride_and_overlap(stride, expected):
    frames = _scene(0, 6 * 12 + 1, shift=1)
    clips = cut_clips(zip(_times(len(frames), 12), frames, strict=True), ClipConfig(stride_s=stride), SHOTS, 12)
    assert [(c.start_s, c.end_s) for c, _, _ in clips] == expected
    first, last = clips[0][1], clips[0][2]
    assert np.array_equal(first, frames[0]) and np.array_equal(last, frames[36])


def test_no_clip_crosses_a_cut():
    fps = 12
    frames = _scene(0, 24, shift=1) + _scene(1, 40, shift=1)  # a cut at 2 s; the second shot lasts 3.25 s
    clips = cut_clips(zip(_times(len(frames), fps), frames, strict=True), ClipConfig(), SHOTS, fps)
    assert [(c.shot, c.start_s, c.end_s) for c, _, _ in clips] == [(1, 2.0, 5.0)]


def test_a_clip_ends_on_the_frame_nearest_below_by_half_a_frame():
    cutter = ClipCutter(ClipConfig(clip_s=1.0), SHOTS, fps=24)
    frames = _scene(0, 30, shift=1)
    done = [c for i, f in enumerate(frames) for c, _, _ in cutter.feed(i, i / 24 - (1e-4 if i == 24 else 0), f)]
    assert [(c.start_index, c.end_index) for c in done] == [(0, 24)]  # 0.99990 s counts as 1 s


def test_pair_ids_are_stable_and_group_by_video():
    sha = "ab" * 32
    assert pair_id(sha, 2.0, 5.0) == "abababababababab-00002000-00005000"
    assert pair_id(sha, 0.0, 3.0).split("-")[0] == pair_id(sha, 3.0, 6.0).split("-")[0]


def test_split_is_by_video_and_meets_the_fraction():
    shas = [f"{i:064x}" for i in range(2000)]
    sides = [split_of(s, 0.1, 0) for s in shas]
    assert abs(sides.count("eval") / len(sides) - 0.1) < 0.02
    assert sides == [split_of(s, 0.1, 0) for s in shas]  # deterministic
    assert split_of(shas[0], 0.0, 0) == "train"


def test_near_duplicates_by_both_hashes():
    a, b = texture(64, 64, 0), texture(64, 64, 1)
    assert distance(phash(a), phash(a)) == 0 and distance(phash(a), phash(b)) > 10
    seen = NearDuplicates(max_distance=4)
    assert seen.check("p0", phash(a), phash(b)) is None
    assert seen.check("p1", phash(a), phash(b)) == "p0"
    assert seen.check("p2", phash(a), phash(a)) is None  # same input, another target: not a duplicate
    assert seen.check("p3", phash((a * 0.98).astype(np.uint8)), phash(b)) == "p0"  # near, not equal


# ---- stages a and b -------------------------------------------------------------------------------------------


def test_motion_thresholds_in_order():
    f = FilterConfig(min_motion=0.01, max_camera_share=0.6, max_motion=0.2, min_object_motion=0.005)
    assert decide(0.009, 0.009, 0.0, f) == ("a", "static")
    assert decide(0.5, 0.01, 0.9, f) == ("b", "camera_motion")  # a fast pan is camera motion, not "too large"
    assert decide(0.3, 0.3, 0.1, f) == ("b", "too_large")
    assert decide(0.05, 0.004, 0.5, f) == ("b", "no_object_motion")
    assert decide(0.05, 0.05, 0.1, f) is None


def test_motion_measures_of_a_pan_and_an_object():
    pan = torch.zeros(1, 32, 32, 2)
    pan[..., 0] = 4.0
    obj = torch.zeros(1, 32, 32, 2)
    obj[:, 8:16, 8:16, 0] = 8.0
    m_pan, m_obj = motion_measures(pan), motion_measures(obj)
    assert m_pan["motion"][0] == pytest.approx(4.0 / math.hypot(32, 32))
    assert m_pan["camera_share"][0] > 0.99 and m_pan["object_motion"][0] < 1e-3
    assert m_obj["motion"][0] == pytest.approx(8.0 * 64 / 1024 / math.hypot(32, 32))
    assert m_obj["camera_share"][0] < 0.01


# ---- stage c: decision logic with a scripted judge ------------------------------------------------------------


def _verdict(judge, pass_digit=3.0):
    frame = torch.zeros(3, 16, 16, dtype=torch.uint8)
    return asyncio.run(judge_pair(judge, frame, frame, pass_digit, 32))


def test_a_pair_passing_every_criterion_gets_an_instruction_and_a_category():
    judge = ScriptedJudge()
    v = _verdict(judge)
    assert v.status == "kept" and v.instruction == INSTRUCTION and v.category == "Locomotion/Distance"
    assert v.scores == dict.fromkeys(CRITERIA, 5.0) and v.attempts == 7  # 4 criteria, summary, rewrite, category
    assert judge.prompts[-1] == prompts.category_prompt(v.summary)


def test_a_criterion_below_the_threshold_drops_the_pair_without_more_calls():
    judge = ScriptedJudge()
    judge.digits = {"subject_integrity": 2}
    v = _verdict(judge)
    assert (v.status, v.reason) == ("dropped", "judge: subject_integrity") and v.instruction == ""
    assert judge.metrics["requests"] == 4
    judge.digits = {"subject_integrity": 3}
    assert _verdict(judge, pass_digit=3.0).status == "kept"  # reaching the threshold passes


@pytest.mark.parametrize("kind", ["rate", "generate", "choose"])
def test_a_failed_judge_call_makes_the_pair_unverified_never_kept(kind):
    judge = ScriptedJudge()
    judge.fail_on = kind
    v = _verdict(judge)
    assert v.status == "unverified" and v.reason.startswith("judge failed: scripted") and v.category == ""


def test_an_empty_instruction_is_unverified():
    judge = ScriptedJudge()
    judge.text = "  "
    assert _verdict(judge).status == "unverified"


def test_the_prompt_digest_covers_every_prompt(monkeypatch):
    digest = prompts.prompt_digest()
    assert len(digest) == 12
    monkeypatch.setitem(prompts.CRITERIA, "visual_quality", "changed")
    assert prompts.prompt_digest() != digest
    assert prompts.clean_instruction('Instruction: "Make the cat jump."\nmore') == "Make the cat jump."


# ---- bad videos -----------------------------------------------------------------------------------------------


def test_bad_videos_are_named(tmp_path):
    cfg = load_curate_config(None, [f"input.videos={tmp_path}", "judge.tiny=true", "input.min_side=32"])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    short = write_video(tmp_path / "short.mp4", iter(_scene(0, 12)), fps=12)
    small = write_video(tmp_path / "small.mp4", iter(_scene(0, 40, side=16)), fps=12)
    expected = {empty: "zero length", junk: "cannot open", short: "too short", small: "too small"}
    for path, reason in expected.items():
        with pytest.raises(BadVideo, match=reason):
            decode(path, cfg.input, cfg.clips)
    data = (whole := write_video(tmp_path / "whole.mp4", iter(_scene(0, 40)), fps=12)).read_bytes()
    whole.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadVideo, match="cannot open"):
        decode(whole, cfg.input, cfg.clips)
    big = load_curate_config(None, [f"input.videos={tmp_path}", "judge.tiny=true", "input.max_bytes=100"])
    with pytest.raises(BadVideo, match="enormous"):
        decode(short, big.input, big.clips)


# ---- stage d: commits, resume, summary -----------------------------------------------------------------------


def _rows(key: str, sha: str, statuses: list[tuple[str, str, str]]) -> list[dict]:
    """A video row and pair rows (status, stage, reason) of 16x16 frames."""
    frame = texture(16, 16, 0).tobytes()
    pairs = [new_row(video=f"/v/{key}.mp4", video_key=key, video_sha256=sha, pair_id=pair_id(sha, 3.0 * i,
                     3.0 * i + 3), start_s=3.0 * i, end_s=3.0 * i + 3, height=16, width=16, input_rgb=frame,
                     target_rgb=frame, input_hash="0" * 16, target_hash=f"{i:016x}", status=status, stage=stage,
                     reason=reason, instruction="Make it move." if status == "kept" else "",
                     category="Pose/Posture" if status == "kept" else "")
             for i, (status, stage, reason) in enumerate(statuses)]  # fmt: skip
    video = new_row(kind="video", video=f"/v/{key}.mp4", video_key=key, video_sha256=sha, status="ok")
    rows = [video, *pairs]
    for r in rows:
        r["video_rows"] = len(rows)
    return rows


def test_a_video_is_committed_once_all_its_rows_arrived_and_resume_skips_it(tmp_path):
    cfg = load_curate_config(None, ["input.videos=/v", "judge.tiny=true", f"output.dir={tmp_path}",
                                    "output.eval_fraction=0.5"])  # fmt: skip
    committer = Committer(cfg, total_videos=2, log=lambda _: None)
    a = _rows("a", "1" * 64, [("kept", "", ""), ("dropped", "a", "static"), ("unverified", "c", "judge failed: x")])
    b = _rows("b", "2" * 64, [("kept", "", ""), ("dropped", "b", "camera_motion")])
    for row in [a[1], b[0], a[0], b[2]]:
        committer.add(row)
    assert committed_keys(tmp_path) == set()  # nothing whole yet
    committer.add(a[2])
    committer.add(a[3])
    assert committed_keys(tmp_path) == {"a"}
    assert not list((tmp_path / "work").glob(".*"))  # no temporary file left
    committer.add(b[1])
    assert committed_keys(tmp_path) == {"a", "b"} and not committer.pending

    summary = finalize(cfg, 0.0)
    assert summary["pairs"] == 5 and summary["unverified"] == 1
    assert sum(summary["kept"].values()) == 2
    videos, stage_a, stage_b, stage_c = summary["stages"]
    assert (videos["in"], videos["dropped"], stage_a["reasons"]) == (2, 0, {"static": 1})
    assert stage_b["reasons"] == {"camera_motion": 1} and stage_c["reasons"] == {"unverified": 1}
    rows = read_manifest(tmp_path)
    assert [r["status"] for r in rows if r["kind"] == "pair"] == ["kept", "dropped", "unverified", "kept", "dropped"]
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert all("preview" not in r and "input_rgb" not in r for r in manifest)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["prompt_digest"] == prompts.prompt_digest() and run["config"]["output"]["dir"] == str(tmp_path)
    assert (tmp_path / "pairs.png").stat().st_size > 0

    data = MotionEditDataset.from_source(str(tmp_path / "dataset"), on_error="raise")
    assert sorted(data.ids) == sorted(r["pair_id"] for r in rows if r["status"] == "kept")
    assert {data[i].extra["split"] for i in range(len(data))} <= {"train", "eval"}


def test_global_dedup_drops_the_later_duplicate_across_videos(tmp_path):
    cfg = load_curate_config(None, ["input.videos=/v", "judge.tiny=true", f"output.dir={tmp_path}",
                                    "filter.dedup_scope=global"])  # fmt: skip
    committer = Committer(cfg, total_videos=2, log=lambda _: None)
    for row in _rows("a", "1" * 64, [("kept", "", "")]) + _rows("b", "2" * 64, [("kept", "", "")]):
        committer.add(row)  # both pairs have the same hashes
    summary = finalize(cfg, 0.0)
    assert sum(summary["kept"].values()) == 1
    data = MotionEditDataset.from_source(str(tmp_path / "dataset"), on_error="raise")
    assert data.ids == [pair_id("1" * 64, 0.0, 3.0)]
    assert summary["stages"][1]["reasons"] == {"near_duplicate": 1}


def test_reason_kinds():
    assert reason_kind("near_duplicate of x-1") == "near_duplicate"
    assert reason_kind("bad video: cannot open: y") == "bad_video"
    assert reason_kind("judge: a, b") == "judge"
    assert summarize([])["pairs"] == 0


# ---- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("clips.height=100", "clips.height: expected a multiple of 16 >= 16, got 100"),
    ("filter.dedup_scope=everywhere", "filter.dedup_scope: expected one of ('video', 'global')"),
    ("filter.max_motion=0.001", "filter.max_motion: expected a value > filter.min_motion"),
    ("judge.pass_digit=6", "judge.pass_digit: expected a value in [0, 5], got 6"),
    ("judge.url=http://x:1/v1", "judge.url: expected only one of"),
    ("input.extensions=[mp4]", "input.extensions[0]: expected a file suffix such as .mp4, got 'mp4'"),
    ("flow.estimator=magic", "flow.estimator: expected one of"),
    ("clips.clip_len=3", "clips.clip_len: unknown key; did you mean 'clips.clip_s'?"),
])  # fmt: skip
def test_config_errors_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_curate_config(None, ["input.videos=/v", "judge.tiny=true", override])


def test_config_needs_videos_and_one_judge(tmp_path):
    with pytest.raises(ConfigError, match="input.videos: expected a local dir"):
        load_curate_config(None, ["judge.tiny=true"])
    with pytest.raises(ConfigError, match="judge.url: expected an endpoint URL"):
        load_curate_config(None, ["input.videos=/v"])
    path = tmp_path / "c.yaml"
    path.write_text("input:\n  videos: /v\n  videos: /w\n")
    with pytest.raises(ConfigError, match="input.videos: duplicate key at line 3"):
        load_curate_config(path)
    cfg = load_curate_config(None, ["input.videos=/v", "judge.scripted=tests.curation_judge:PassingJudge"])
    assert cfg.judge.client_config().served_model_name == "judge" and isinstance(cfg, CurateConfig)


def test_the_judge_and_flow_sections_are_the_trainers_keys_plus_their_own():
    """The keys the curation shares with `reward.judge` / `reward.flow` are declared once (JudgeServingConfig,
    FlowEstimatorConfig) and reach the judge client as set; the curation keeps its own retry budget."""
    cfg = load_curate_config(None, ["input.videos=/v", "judge.tiny=true", "judge.max_concurrency=3",
                                    "judge.image_format=jpeg", "flow.estimator=dis"])  # fmt: skip
    client = cfg.judge.client_config()
    assert (client.tiny, client.max_concurrency, client.image_format) == (True, 3, "jpeg")
    assert (client.mode, client.on_outage, client.retry_budget_s) == ("score", "drop", 120.0)
    assert JudgeConfig().retry_budget_s == 600.0 and isinstance(cfg.flow, FlowEstimatorConfig)
    assert isinstance(build_flow_estimator(cfg.flow), ClassicalFlow)
    with pytest.raises(ConfigError, match=r"^judge\.max_backoff_s: expected a value >= judge\.backoff_s, got 0\.1$"):
        load_curate_config(None, ["input.videos=/v", "judge.tiny=true", "judge.max_backoff_s=0.1"])


# ---- the trainer's split by column -----------------------------------------------------------------------------


def test_the_trainer_split_by_column_keeps_each_source_video_on_one_side(tmp_path):
    cfg = load_curate_config(None, ["input.videos=/v", "judge.tiny=true", f"output.dir={tmp_path}",
                                    "output.eval_fraction=0.5"])  # fmt: skip
    committer = Committer(cfg, total_videos=8, log=lambda _: None)
    for v in range(8):
        for row in _rows(f"v{v}", str(v + 1) * 64, [("kept", "", "")] * 3):
            committer.add(row)
    finalize(cfg, 0.0)
    data = MotionEditDataset.from_source(str(tmp_path / "dataset"), on_error="raise")
    train, evaluation = data.split_by("split")
    videos = [{train[i].extra["source_video"] for i in range(len(train))},
              {evaluation[i].extra["source_video"] for i in range(len(evaluation))}]  # fmt: skip
    assert videos[0] and videos[1] and not videos[0] & videos[1]
    assert len(train) + len(evaluation) == 24
    # the id-hash split, the default, would put pairs of one video on both sides
    by_hash = data.split(0.5, 0)
    assert {by_hash[0][i].extra["source_video"] for i in range(len(by_hash[0]))} & {
        by_hash[1][i].extra["source_video"] for i in range(len(by_hash[1]))}
    with pytest.raises(DataError, match="data.split_column 'source_video' is '/v/v"):
        data.split_by("source_video")


def test_an_embedded_cluster_too_small_for_the_workers_is_refused():
    from curation.pipeline import check_cpus

    cfg = load_curate_config(None, ["input.videos=/v", "judge.scripted=a:b", "cluster.decode_workers=2",
                                    "cluster.decode_cpus=1", "flow.workers=2", "flow.cpus=1",
                                    "judge.cpus=0.5"])  # fmt: skip
    check_cpus(cfg, 5.0)  # 2 + 2 + 0.5 (one judge actor; a scripted judge starts no replica)
    with pytest.raises(ConfigError, match="cluster.decode_workers: the pipeline asks for 4.5 CPUs"):
        check_cpus(cfg, 4.0)


def test_videos_under_an_s3_prefix_are_listed_and_fetched(s3_bucket, tmp_path):
    """`input.videos` as an s3:// prefix (moto): listed with the same filter as a folder (suffixes, in path order,
    `input.limit`), fetched into `input.cache_dir` once, and decoded to the frames of the local file."""
    from curation.config import InputConfig
    from curation.video import list_videos, local_copy
    from motionnft_core import s3

    local = write_video(tmp_path / "clip.mp4", (texture(64, 64, seed=i) for i in range(36)), fps=12)  # 3 s
    prefix = f"s3://{s3_bucket}/videos"
    for key in ("b/two.mp4", "a/one.MP4", "notes.txt"):
        s3.upload_file(local, f"{prefix}/{key}")
    cfg = InputConfig(videos=prefix, cache_dir=str(tmp_path / "cache"))
    assert list_videos(cfg) == [f"{prefix}/a/one.MP4", f"{prefix}/b/two.mp4"]
    assert list_videos(InputConfig(videos=prefix, limit=1)) == [f"{prefix}/a/one.MP4"]
    fetched = local_copy(f"{prefix}/b/two.mp4", cfg)
    assert fetched.is_relative_to(tmp_path / "cache") and fetched.read_bytes() == local.read_bytes()
    clips = CurateConfig().clips
    frames = [f for _, f in decode(fetched, cfg, clips)[1]]
    assert len(frames) == 36 and all(np.array_equal(a, b) for a, b in
                                     zip(frames, [f for _, f in decode(local, cfg, clips)[1]], strict=True))
