"""Videos to training, end to end: `python -m curation.main` on the sample videos (H.264 written by PyAV) with the
scripted judge, then `python -m learner.main` (configs/tiny_cpu.yaml, judge off as in test_e2e.py) for a few steps on
the curated parquet, unchanged, split by `data.split_column=split`: no source video on both sides."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from curation.clips import split_of
from curation.samples import write_samples
from motionnft_core.config_loader import load_config
from motionnft_core.data.motionedit import load_splits
from tests import harness

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EVAL_FRACTION = 0.5


def _seed_with(videos: dict[str, Path], train: str, evaluation: str) -> int:
    """An output.seed putting `train` on the train side and `evaluation` on the eval side (the encoder's bytes, and so
    the content hashes, may differ between FFmpeg builds)."""
    sha = {name: hashlib.sha256(videos[name].read_bytes()).hexdigest() for name in (train, evaluation)}
    return next(s for s in range(1000) if split_of(sha[train], EVAL_FRACTION, s) == "train"
                and split_of(sha[evaluation], EVAL_FRACTION, s) == "eval")  # fmt: skip


def test_curate_sample_videos_then_train_on_them(tmp_path):
    videos = write_samples(tmp_path / "videos")
    seed = _seed_with(videos, "objects.mp4", "cut.mp4")
    env = {"PYTHONPATH": str(ROOT)}  # the Ray workers import the scripted judge from tests/
    curated = harness.run(
        f"input.videos={tmp_path / 'videos'}", f"output.dir={tmp_path / 'curated'}", "judge.tiny=false",
        "judge.scripted=tests.curation_judge:PassingJudge", f"output.seed={seed}",
        f"output.eval_fraction={EVAL_FRACTION}", module="curation.main", config=ROOT / "configs" / "curate_tiny.yaml",
        env=env, timeout_s=600,
    )  # fmt: skip
    assert curated.returncode == 0, curated.tail()
    assert "train 2, eval 1" in curated.stdout and "bad video" in curated.stdout

    dataset = tmp_path / "curated" / "dataset"
    args = [f"data.source={dataset}", "data.synthetic=0", "data.split_column=split", "reward.judge_weight=0",
            "reward.flow_weight=1", "learner.steps=2", f"checkpoint.dir={tmp_path / 'ckpt'}",
            f"logging.dir={tmp_path / 'run'}", "nft.group_min_std=-1", "nft.group_max_mean=2"]  # fmt: skip
    train, evaluation = load_splits(load_config(harness.TINY_CPU, args))
    sides = [{d[i].extra["source_video"] for i in range(len(d))} for d in (train, evaluation)]
    assert sides == [{str(videos["objects.mp4"])}, {str(videos["cut.mp4"])}]  # no video on both sides
    trained = harness.run(*args, timeout_s=600)
    assert trained.returncode == 0, trained.tail()
    assert harness.steps_logged(tmp_path / "run") == [0, 1]
