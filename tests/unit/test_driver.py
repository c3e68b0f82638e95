"""The driver's own state (learner/driver/loop.py): the prompt cursor over passes, bans, and resuming it exactly."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from learner.driver.loop import DriverState, PromptCursor

IDS = [f"p{i}" for i in range(7)]


def _draws(cursor: PromptCursor, sizes: list[int], banned: list[str] = ()) -> list[list[str]]:
    return [[IDS[i] for i in cursor.draw(n, banned)] for n in sizes]


def test_each_pass_is_a_seeded_permutation_and_wraps_into_the_next():
    cursor = PromptCursor(IDS, seed=3)
    drawn = [p for batch in _draws(cursor, [3, 3, 3, 3, 2]) for p in batch]  # 14 = two full passes
    first, second = drawn[:7], drawn[7:]
    assert sorted(first) == sorted(second) == IDS  # every prompt once per pass, the 3rd draw spans both
    assert first != second  # each pass has its own order
    assert (cursor.epoch, cursor.position) == (2, 0)
    assert first == [IDS[i] for i in PromptCursor(IDS, seed=3).draw(7, [])]  # the seed fixes it
    assert first != [IDS[i] for i in PromptCursor(IDS, seed=4).draw(7, [])]


def test_banned_prompts_are_skipped_in_every_later_pass():
    banned = ["p1", "p4"]
    cursor = PromptCursor(IDS, seed=0)
    drawn = [p for batch in _draws(cursor, [5, 5, 5], banned) for p in batch]
    assert "p1" not in drawn and "p4" not in drawn
    assert sorted(drawn[:5]) == sorted(drawn[5:10]) == sorted(set(IDS) - {"p1", "p4"})
    banned.append("p0")  # a ban during a pass holds from the next draw on
    assert "p0" not in [IDS[i] for i in cursor.draw(10, banned)]


def test_everything_banned_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="every training prompt is banned"):
        PromptCursor(IDS, seed=0).draw(1, list(IDS))


def test_a_resumed_cursor_continues_the_same_permutation():
    """The cursor's place is saved in DriverState, which a checkpoint saves as JSON: restoring it mid-pass draws
    exactly what the uninterrupted run draws."""
    expected = _draws(PromptCursor(IDS, seed=1), [4, 4, 4, 4], ["p2"])

    cursor = PromptCursor(IDS, seed=1)
    before = _draws(cursor, [4], ["p2"])  # stop mid-pass (position 5 of 7: p2 was skipped)
    assert 0 < cursor.position < len(IDS)
    state = DriverState(run_id="r", epoch=cursor.epoch, position=cursor.position, banned=["p2"])
    saved = json.loads(json.dumps(asdict(state)))  # as driver.json holds it
    resumed = DriverState(**saved)
    after = _draws(PromptCursor(IDS, seed=1, epoch=resumed.epoch, position=resumed.position), [4, 4, 4],
                   resumed.banned)  # fmt: skip
    assert before + after == expected


def test_learner_recoveries_are_capped_per_window_not_per_run():
    """learner.max_recoveries within learner.recovery_window_s: a multi-day run may lose a rank every few hours."""
    from learner.driver.recovery import SlidingWindow

    window = SlidingWindow(limit=2, window_s=100.0)
    assert window.record(0.0) and window.record(0.0) and len(window) == 2
    assert not window.record(50.0)  # a third within the window: refused (the run stops there)
    fresh = SlidingWindow(limit=2, window_s=100.0)
    assert fresh.record(0.0) and fresh.record(0.0)
    assert fresh.record(100.0) and len(fresh) == 1  # the first two left the window
    assert SlidingWindow(limit=0, window_s=100.0).record(1000.0) is False  # 0: the first lost rank ends it


# ------------------------------------------------------------------------------------------------ run identity


def test_training_relevant_keys_are_all_but_the_operational_ones():
    from learner.driver.identity import training_keys_that_differ
    from motionnft_core.config_loader import config_to_dict, load_config

    base = config_to_dict(load_config("configs/tiny_cpu.yaml"))
    operational = ["learner.steps=9", "cluster.rollout_workers=1", "checkpoint.every=1", "logging.dir=/elsewhere",
                   "reward.judge.timeout_s=5", "learner.micro_batch=2", "model.cache_dir=/c",
                   "cluster.learner_resources={node_a: 1}"]  # fmt: skip
    assert training_keys_that_differ(base, config_to_dict(load_config("configs/tiny_cpu.yaml", operational))) == []
    changed = ["nft.beta=0.5", "reward.flow.q=0.3", "data.seed=2", "rollout.group_size=2",
               "model.family=qwen_image_edit"]
    got = training_keys_that_differ(base, config_to_dict(load_config("configs/tiny_cpu.yaml", changed)))
    assert got == ["data.seed", "model.family", "nft.beta", "reward.flow.q", "rollout.group_size"]


def test_a_checkpoint_from_before_a_key_existed_resumes_under_its_default():
    """A checkpoint's config that lacks a key (written before the key existed) reads as the key's default: the run
    resumes while the key keeps its default, and is refused once the run sets it otherwise."""
    from learner.driver.identity import training_keys_that_differ
    from motionnft_core.config import Config
    from motionnft_core.config_loader import config_to_dict, load_config

    defaults = config_to_dict(Config())
    old = config_to_dict(load_config("configs/tiny_cpu.yaml"))
    del old["nft"]["motion_focal"], old["reward"]["preservation_weight"]  # as a checkpoint of before the levers
    now = config_to_dict(load_config("configs/tiny_cpu.yaml"))
    assert training_keys_that_differ(old, now, defaults) == []
    assert training_keys_that_differ(old, now) == ["nft.motion_focal", "reward.preservation_weight"]  # no schema
    turned_on = config_to_dict(load_config("configs/tiny_cpu.yaml", ["nft.motion_focal=true"]))
    assert training_keys_that_differ(old, turned_on, defaults) == ["nft.motion_focal"]
    old["nft"]["retired_key"] = 1  # a key the schema no longer knows still counts as a difference
    assert training_keys_that_differ(old, now, defaults) == ["nft.retired_key"]


def test_metrics_log_keeps_each_step_once_on_resume(tmp_path):
    from learner.driver.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (0, 1, 2, 3, 3)))
    MetricsLog(tmp_path, 1, resume_at=2, recovered={"step": 1, "x": 99})  # line 1 exists: kept as written
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"step": 0, "x": 0}, {"step": 1, "x": 1}]
    path.write_text(json.dumps({"step": 0, "x": 0}) + "\n")  # killed between the commit of step 1 and its line
    log = MetricsLog(tmp_path, 1, resume_at=2, recovered={"step": 1, "x": 99})
    log.write(2, {"x": 2.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert json.loads(path.read_text().splitlines()[1])["x"] == 99
    MetricsLog(tmp_path, 1)  # a fresh run starts an empty log
    assert path.read_text() == ""


def test_step_lines_show_an_eta_from_the_recent_steps(tmp_path, capsys):
    from learner.driver.loop import MetricsLog

    log = MetricsLog(tmp_path, 1, steps=100)
    log.write(0, {"reward/mean": 0.5, "timing_s/step": 30.0})  # 99 steps left at 30 s
    log.write(1, {"timing_s/step": 8.0, "timing_s/checkpoint": 2.0})  # (30 + 10) / 2 = 20 s, 98 left
    for step in range(2, 12):  # only the last 10 steps count: 4 s each, 88 left
        log.write(step, {"timing_s/step": 4.0})
    log.write(99, {"timing_s/step": 4.0})  # the last step: nothing left to estimate
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 0  reward/mean 0.5  timing_s/step 30  eta 0:49:30"
    assert lines[1].endswith("eta 0:32:40") and lines[11].endswith("eta 0:05:52")
    assert "eta" not in lines[12]


def test_a_checkpoint_dir_holds_one_run(tmp_path):
    """start_state (no Ray): a fresh start over checkpoints is refused, --overwrite deletes them and starts a new
    run id, --resume takes the run's id and state (with the base policy's held-out MAS, the rollout pool's size
    and the elastic scaler's streaks)."""
    from learner.driver.loop import DriverState, start_state
    from learner.trainer.checkpoint import CheckpointManager
    from motionnft_core.config import ConfigError
    from motionnft_core.config_loader import config_to_dict, load_config

    cfg = load_config("configs/tiny_cpu.yaml", [f"checkpoint.dir={tmp_path / 'ckpt'}"])
    ckpt = CheckpointManager(cfg.checkpoint.dir, keep=3)
    fresh, recovered = start_state(cfg, ckpt, resume=False, overwrite=False)
    assert fresh.step == 0 and len(fresh.run_id) == 12 and recovered is None
    for step in (2, 4):
        target = ckpt.begin(step)
        (Path(target) / "learner").mkdir()
        (Path(target) / "learner" / ".metadata").write_text("m")
        state = DriverState(run_id=fresh.run_id, step=step, version=step, base_mas=[12.5, 40.0][: step // 2],
                            rollout_workers=step + 1, rollout_slow=step - 1, rollout_idle=step - 2)  # fmt: skip
        ckpt.commit(step, target, {"driver": dataclasses.asdict(state), "config": config_to_dict(cfg),
                                   "metrics": {"step": step - 1}}, written=["learner/.metadata"])  # fmt: skip
    with pytest.raises(ConfigError, match="already holds checkpoints .latest step_00000004.; pass --resume"):
        start_state(cfg, ckpt, resume=False, overwrite=False)
    resumed, recovered = start_state(cfg, ckpt, resume=True, overwrite=False)
    assert (resumed.run_id, resumed.step, recovered) == (fresh.run_id, 4, {"step": 3})
    assert resumed.base_mas == [12.5, 40.0]  # the held-out base, measured once per run
    assert resumed.rollout_workers == 5  # the rollout pool's size, to which an elastic one regrows
    assert (resumed.rollout_slow, resumed.rollout_idle) == (3, 2)  # the elastic scaler's streaks go on
    other, _ = start_state(cfg, ckpt, resume=False, overwrite=True)
    assert other.step == 0 and other.run_id != fresh.run_id and ckpt.complete_steps() == []
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_the_sample_version_rule_by_hand():
    """The rule the whole-run tests hold every sample's version to (tests/sample_versions.py)."""
    from tests.sample_versions import sample_versions

    # staleness 1, a checkpoint every 2 steps (steps 1, 3 drain), 5 steps all trained: step 0 and 1 at version 0
    # (both submitted at step 0), 2 and 3 at 2 (submitted at step 2, after step 1's drain), 4 at 4.
    assert sample_versions([True] * 5, ahead=1, every=2) == [0, 0, 2, 2, 4]
    assert sample_versions([True] * 4, ahead=0, every=0) == [0, 1, 2, 3]  # on-policy
    assert sample_versions([True, False, True, True], ahead=1, every=0) == [0, 0, 1, 1]  # step 1 published none
