"""The main job end to end on an embedded Ray cluster: both model families, full fine-tuning, steps without a
valid group, a bad config. (`ray job submit`, checkpoints and resume equivalence run on a real multi-node cluster
in tests/system/test_multinode.py.)

Each run is a real `python -m learner.main` process (2 FSDP2 learner ranks over gloo, 2 rollout workers, a
reward worker, unless a test says otherwise). The judge is off here to keep the suite short
(tests/ray/test_reward_worker.py runs it live).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from actors.eval_sampler import EvalSampler
from actors.rollout import image_digests
from actors.sampler import Sampler
from motionnft_core.config_loader import load_config
from motionnft_core.data.motionedit import load_splits
from motionnft_core.models.policy import load_policy
from motionnft_core.models.weights import load_exported_policy
from motionnft_core.net import free_port
from motionnft_core.noise import candidate_seed
from rewards.eval_scorer import build_eval_scorer
from tests import harness
from tests.metrics_doc import assert_metrics_documented
from tests.prometheus import Scraper, dashboard_queries, step_keys

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _overrides(tmp: Path, steps: int, family: str = "flux_kontext") -> list[str]:
    return [
        f"model.family={family}",
        "reward.judge_weight=0",
        "reward.flow_weight=1",
        f"learner.steps={steps}",
        "checkpoint.every=3",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"logging.dir={tmp / 'run'}",
        # Every group trains (the tiny random policy's rewards barely vary), so each step has a learner loss.
        "nft.group_min_std=-1",
        "nft.group_max_mean=2",
        "cluster.num_cpus=4",
    ]


def _main(args: list[str], timeout: int = 420, env: dict[str, str] | None = None) -> harness.Finished:
    proc = harness.run(*args, env=env, timeout_s=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_the_adapter_trained(exported, example) -> None:
    """The exported adapter moves the policy's velocity on `example` (all its input images) off the base one."""
    cond = exported.encode([example.prompt], [im[None] for im in example.input_images])
    x = exported.prepare_latents(1, 64, 64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = exported.velocity(x, torch.tensor([0.5]), cond)
        with exported.adapters_disabled():
            assert (v - exported.velocity(x, torch.tensor([0.5]), cond)).abs().max() > 0


def test_qwen_image_edit_plus_trains_on_two_input_images(tmp_path):
    """Qwen-Image-Edit-2511's pipeline end to end, two steps: every synthetic example with a second input image
    (data.synthetic_reference), the held-out evaluation after each step (true CFG, the references included), a
    LoRA export the stock pipeline loads."""
    extra = ["data.synthetic_reference=true", "checkpoint.every=2", "eval.every=1", "eval.during_rows=2",
             "eval.num_steps=2", "cluster.rollout_workers=1", "cluster.learner_ranks=1"]  # fmt: skip
    proc = _main(_overrides(tmp_path, 2, family="qwen_image_edit_plus") + extra)
    out = proc.stdout + proc.stderr
    assert "qwen_image_edit_plus (tiny random weights, float32), LoRA r4 on" in out
    metrics = harness.metrics_rows(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1] and all("learner/loss" in m for m in metrics)
    assert all(m["eval/rows"] == 2 and 0 <= m["eval/mas"] <= 100 for m in metrics)
    cfg = load_config(str(ROOT / "configs/tiny_cpu.yaml"),
                      _overrides(tmp_path, 2, family="qwen_image_edit_plus") + extra)  # fmt: skip
    train, _ = load_splits(cfg)
    assert len(train[0].reference_images) == 1
    _assert_the_adapter_trained(load_exported_policy(cfg, tmp_path / "ckpt" / "step_00000002" / "lora"), train[0])


@pytest.mark.parametrize("family", ["flux2_klein", "flux2_dev"])
def test_flux2_trains_on_two_input_images(tmp_path, family):
    """FLUX.2 [klein]'s and [dev]'s pipelines end to end, two steps on one rollout worker and one learner rank: a
    second input image per example, the held-out evaluation after each step, a LoRA export (the single-stream
    blocks' fused layers included) that the stock pipeline loads."""
    extra = ["data.synthetic_reference=true", "checkpoint.every=2", "eval.every=1", "eval.during_rows=2",
             "eval.num_steps=2", "cluster.rollout_workers=1", "cluster.learner_ranks=1",
             "model.max_sequence_length=64"]  # fmt: skip
    proc = _main(_overrides(tmp_path, 2, family=family) + extra)
    out = proc.stdout + proc.stderr
    assert f"{family} (tiny random weights, float32), LoRA r4 on" in out
    metrics = harness.metrics_rows(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1] and all("learner/loss" in m for m in metrics)
    assert all(m["eval/rows"] == 2 for m in metrics)
    cfg = load_config(str(ROOT / "configs/tiny_cpu.yaml"), _overrides(tmp_path, 2, family=family) + extra)
    train, _ = load_splits(cfg)
    exported = load_exported_policy(cfg, tmp_path / "ckpt" / "step_00000002" / "lora")
    names = [n for n, _ in exported.transformer.named_parameters() if "lora_A" in n]
    assert any("single_transformer_blocks" in n and "to_qkv_mlp_proj" in n for n in names)
    assert any("single_transformer_blocks" in n and "attn.to_out.lora_A" in n for n in names)
    _assert_the_adapter_trained(exported, train[0])


def test_qwen_image_edit_trains(tmp_path):
    """Qwen-Image-Edit end to end, with v_old / v_ref computed on the rollout pool (bench/README.md); its Ray metrics
    scraped from the embedded cluster's Prometheus endpoint while it runs; the held-out evaluation after every
    step (eval.every=1: 2 rows, 2-step edits with true CFG on the rollout workers, MAS on the reward worker)."""
    port = free_port("127.0.0.1")
    extra = ["checkpoint.every=0", "nft.reference_forwards=rollout", "logging.image_every=1", "logging.image_size=32",
             f"cluster.metrics_export_port={port}",
             "eval.every=1", "eval.during_rows=2", "eval.num_steps=2"]  # fmt: skip
    with Scraper(port, "ray_motionnft_") as scraper:  # workers report every 0.5 s (Ray's default: 10 s)
        proc = _main(_overrides(tmp_path, 2, family="qwen_image_edit") + extra,
                     env={"RAY_metrics_report_interval_ms": "500"})  # fmt: skip
    # The console: a start-up summary of what runs where, no config dump, no actor's loading progress bars.
    out = proc.stdout + proc.stderr
    assert f"config: {tmp_path / 'run'}/config.json" in out and '"nft": {' not in out
    assert "qwen_image_edit (tiny random weights, float32), LoRA r4 on" in out
    assert "data: 30 train / 2 eval examples; 8 samples per step (2 prompts x 4); steps 0 to 1" in out
    assert "rollout workers: rollout-0: pid " in out and "reward workers: pid " in out
    assert "judge: off (reward.judge_weight=0)" in out and "learner ranks: rank 0: pid " in out
    assert "Loading pipeline components" not in out and "Loading weights" not in out
    metrics = harness.metrics_rows(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1] and all("learner/loss" in m for m in metrics)
    assert (tmp_path / "ckpt" / "step_00000002" / "COMMITTED").exists()
    assert f"metrics: http://127.0.0.1:{port}/metrics" in out
    for m in metrics:  # the held-out slice, logged with each step; no judge in this run: no rubric
        assert m["eval/rows"] == 2 and 0 <= m["eval/mas"] <= 100 and 0 <= m["eval/base_mas"] <= 100
        assert m["eval/mas_win_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0) and m["timing_s/eval"] > 0
        assert "eval/overall" not in m and "eval/lost" not in m
    _check_ray_metrics(scraper, metrics)

    # TensorBoard, read back: every scalar of metrics.jsonl, and per step a grid and caption for each of 2 groups.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    board.Reload()
    for key in ("reward/mean", "learner/loss", "timing_s/step", "policy/version", "eval/mas"):
        events = board.Scalars(key)  # float32 in the event file
        assert [e.step for e in events] == [0, 1]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert sorted(board.Tags()["images"]) == ["groups/0", "groups/1"]
    grid = board.Images("groups/0")[-1]
    assert grid.step == 1 and (grid.height, grid.width) == (32, 32 * (4 + 2))  # input | 4 candidates | target
    caption = board.Tensors("groups/0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert caption.startswith(metrics[1]["prompts"][0] + ": ") and "rewards, best first: " in caption

    # Lineage: a row per candidate; step 0's first group replayed bit-exactly from its rows (version 0: the
    # initial adapter, whose B = 0 adds exactly nothing).
    rows = pq.read_table(tmp_path / "run" / "lineage" / "step_00000000.parquet").to_pylist()
    assert len(rows) == 2 * 4 and sorted({r["prompt_id"] for r in rows}) == sorted(metrics[0]["prompts"])
    assert all(r["version"] == 0 and r["valid"] and r["worker"].startswith("rollout-") for r in rows)
    assert [r["reward"] for r in rows] == [r["flow/reward"] for r in rows]  # flow_weight 1, judge off
    group = [r for r in rows if r["prompt_id"] == rows[0]["prompt_id"]]
    cfg = load_config(str(ROOT / "configs/tiny_cpu.yaml"), _overrides(tmp_path, 2, family="qwen_image_edit"))
    assert [r["seed"] for r in group] == [candidate_seed(cfg.rollout.seed, 0, group[0]["prompt_id"], k)
                                          for k in range(4)]  # fmt: skip
    example = next(x for x in load_splits(cfg)[0] if x.id == group[0]["prompt_id"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the rollout actor (Ray gives a fractional-CPU actor one thread)
    try:
        policy = load_policy(cfg.model, use_gpu=False, lora=cfg.nft)
        ((_, images),) = Sampler(policy, cfg.rollout).sample([example], step=0, version=0)
    finally:
        torch.set_num_threads(threads)
    assert image_digests(images) == [r["image_digest"] for r in group]

    # The held-out evaluation of the last step measured the eval EMA that step's checkpoint exports: its MAS is
    # that of the export's edits, loaded by diffusers' own LoRA loader here.
    cfg = load_config(str(ROOT / "configs/tiny_cpu.yaml"), _overrides(tmp_path, 2, family="qwen_image_edit") + extra)
    rows = [load_splits(cfg)[1][i] for i in range(2)]
    torch.set_num_threads(1)
    try:
        policy = load_exported_policy(cfg, str(tmp_path / "ckpt" / "step_00000002" / "lora"))
        edits = [EvalSampler(policy, cfg.eval).sample(row.prompt, row.input_image) for row in rows]
    finally:
        torch.set_num_threads(threads)
    scorer = build_eval_scorer(cfg.reward.flow, cfg.reward.judge, (), device="cpu", cache_dir=cfg.model.cache_dir)
    mas = [s["mas"]["mas"] for s in asyncio.run(scorer.score(rows, edits, cfg.eval))]
    assert metrics[1]["eval/mas"] == pytest.approx(sum(mas) / len(mas), abs=1e-9), mas

    # Every key the run logged has its row in docs/metrics.md.
    assert_metrics_documented(tmp_path / "run" / "metrics.jsonl")


def _check_ray_metrics(scraper: Scraper, metrics: list[dict]) -> None:
    """The series of motionnft_core/telemetry.py with sane values, from the driver, both rollout workers, the reward
    worker
    and both learner ranks, and every `key` the Grafana dashboard selects. Only what step 0 (or the start) records
    is required: a worker's last report may not leave before the run ends and the worker with it."""
    step = {s.label("key"): s.value for s in scraper.series("ray_motionnft_step", pool="driver", worker="driver")}
    print("scraped", scraper.scrapes, "times:", {k: round(v, 4) for k, v in sorted(step.items())})
    for key in ("reward/mean", "reward/std", "reward/flow/l_q", "groups/valid", "staleness/max", "learner/loss",
                "eval/mas"):
        assert any(step[key] == pytest.approx(m[key], rel=1e-9) for m in metrics), key  # one of the two steps
    assert step["perf/samples_per_s"] > 0 and 0 <= step["reward/mean"] <= 1 and step["groups/banned_total"] == 0
    assert all(step[k] > 0 for k in ("timing_s/step", "timing_s/train", "learner/forward_s", "learner/backward_s"))
    for op, value in {m for q in dashboard_queries() for m in step_keys(q)}:  # the dashboard selects real keys
        assert (value in step) if op == "=" else any(re.fullmatch(value, k) for k in step), (op, value)

    queues = {s.label("queue"): s.value for s in scraper.series("ray_motionnft_queue_groups")}
    assert 0 <= queues["reward"] <= 2 and 0 <= queues["learner"] <= 2
    busy = {(s.label("pool"), s.label("worker")): s.value for s in scraper.series("ray_motionnft_busy_fraction")}
    assert {w for _, w in busy} >= {"rollout-0", "rollout-1", "rank0", "rank1"}, busy
    assert {p for p, _ in busy} == {"rollout", "reward", "learner"} and all(0 < v <= 1 for v in busy.values())
    samples = {s.label("worker"): s.value for s in scraper.series("ray_motionnft_samples_total", pool="rollout")}
    assert set(samples) == {"rollout-0", "rollout-1"} and 8 <= sum(samples.values()) <= 16  # 2 steps x 2 x 4
    calls = {(s.label("pool"), s.label("phase")): s.value for s in scraper.series("ray_motionnft_phase_seconds_count")}
    for phase in [("rollout", "sample"), ("rollout", "load_weights"), ("reward", "score"), ("reward", "flow"),
                  ("learner", "forward"), ("learner", "backward"), ("learner", "train"), ("learner", "publish")]:
        assert calls.get(phase, 0) >= 1, (phase, calls)
    for s in scraper.series("ray_motionnft_phase_seconds_bucket", le="+Inf"):  # every observation in a bucket
        labels = {k: v for k, v in s.labels if k != "le"}
        assert s.value == scraper.latest[("ray_motionnft_phase_seconds_count", tuple(sorted(labels.items())))].value
    synced = {s.label("worker"): s.value for s in scraper.series("ray_motionnft_weight_sync_bytes_total")}
    assert synced["rank0"] > 0 and synced["rollout-0"] > 0 and "rank1" not in synced  # rank 0 publishes
    assert len({s.label("job") for s in scraper.latest.values()}) == 1  # one run: one Ray job


def test_bad_config_fails_fast_naming_the_key(tmp_path):
    proc = harness.run("rollout.group_size=1", timeout_s=60)
    assert proc.returncode == 2 and "rollout.group_size" in proc.stderr


def test_full_finetune_end_to_end(tmp_path):
    """Full weights flow learner -> driver (by reference) -> rollouts; the checkpoint exports the EMA transformer.
    The rollouts sample in FP8 (`rollout.fp8`): each full push re-quantizes their float8 copies, and the parity
    probe still sees the plain model (float32 rounding, not FP8's error). The held-out evaluation's base policy
    (the weights as loaded, gone after the first push) is measured before step 0, used by every evaluation and
    carried by the checkpoint (a resume reads it back: tests/unit/test_driver.py)."""
    _main(_overrides(tmp_path, 2) + ["nft.full_finetune=true", "checkpoint.every=0", "rollout.fp8=true",
                                     "eval.every=1", "eval.during_rows=2", "eval.num_steps=2"])  # fmt: skip
    metrics = harness.metrics_rows(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1] and all("learner/loss" in m for m in metrics)
    assert all(m["parity/max_error"] < 1e-4 for m in metrics)
    assert metrics[1]["staleness/max"] <= 1
    assert metrics[0]["eval/base_mas"] == metrics[1]["eval/base_mas"] and 0 <= metrics[1]["eval/base_mas"] <= 100
    assert all(m["eval/mas_win_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0) for m in metrics)
    step = tmp_path / "ckpt" / "step_00000002"
    saved = json.loads((step / "driver.json").read_text())["driver"]["base_mas"]
    assert len(saved) == 2 and sum(saved) / 2 == pytest.approx(metrics[1]["eval/base_mas"], rel=1e-12)
    assert (step / "COMMITTED").exists() and not (step / "lora").exists()
    assert (step / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_steps_without_a_valid_group_publish_nothing_and_go_on(tmp_path):
    """Every group filtered out (std can never exceed 10): no update, no new version, and the overlapped
    rollouts of later steps still find the weights they may use. A full fine-tune, evaluated every step: its
    eval EMA never moves from the weights as loaded, so its edits score exactly as the base policy's. One learner
    rank and one rollout worker: nothing trains here (a full fine-tune over two ranks: the test above)."""
    _main(_overrides(tmp_path, 3) + ["nft.group_min_std=10", "checkpoint.every=0", "nft.full_finetune=true",
                                     "eval.every=1", "eval.during_rows=2", "eval.num_steps=2",
                                     "cluster.learner_ranks=1", "cluster.rollout_workers=1"])  # fmt: skip
    metrics = harness.metrics_rows(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert m["groups/valid"] == 0 and "learner/loss" not in m
        assert m["staleness/max"] == 0  # nothing was ever published after version 0
        assert m["eval/mas"] == m["eval/base_mas"] and m["eval/mas_win_rate"] == 0.5  # ties, row by row
