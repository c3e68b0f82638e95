"""evaluation/ without a training run or Ray: grid and plot files, checkpoint resolution, LoRA loading, the CLI
(`python -m evaluation.main heldout`, and what `compare` refuses before it writes or starts anything).

A "checkpoint" here is written the way the driver writes one (`checkpoint.export_lora` of an adapter state into
`step_N/lora/`, then the COMMITTED marker), with known random adapter weights instead of trained ones.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import compare
from evaluation import heldout as ev
from evaluation import main as cli
from evaluation.report import write_grid
from learner.trainer.checkpoint import export_lora, step_name
from motionnft_core.config_loader import load_config
from motionnft_core.models.weights import load_exported_policy
from tests.eval_runs import ALPHA, RANK, TARGETS, adapter_state, kontext_run_tree, write_checkpoint, write_config
from tests.storage_helpers import upload_dir

# ------------------------------------------------------------------------------------------------ files


def test_write_grid_size_and_layout(tmp_path):
    n, h, w, scale = 2, 8, 12, 3
    colours = {"in": (10, 20, 30), "gt": (40, 50, 60), "edit": (70, 80, 90)}
    batches = {
        k: torch.tensor(c, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, h, w).clone() for k, c in colours.items()
    }
    batches["edit"][1] = 255  # second row's edit is white
    path = write_grid(batches["in"], batches["gt"], batches["edit"], tmp_path / "g" / "grid.png", scale=scale)
    image = Image.open(path)
    assert image.format == "PNG"
    assert image.size == (3 * w * scale, n * h * scale)  # (width, height): 3 columns, one row per example
    px = np.asarray(image.convert("RGB"))
    # Centre of each cell: row r, column c at (r*h + h/2, c*w + w/2) before scaling.
    for col, key in enumerate(("in", "gt", "edit")):
        y, x = (h // 2) * scale, (col * w + w // 2) * scale
        assert tuple(px[y, x]) == colours[key]
    assert tuple(px[(h + h // 2) * scale, (2 * w + w // 2) * scale]) == (255, 255, 255)


def test_write_grid_one_column_per_edit_batch(tmp_path):
    n, h, w = 3, 4, 4
    batches = [torch.full((n, 3, h, w), v, dtype=torch.uint8) for v in (0, 50, 100, 150)]
    path = write_grid(batches[0], batches[1], batches[2:], tmp_path / "grid.png")
    px = np.asarray(Image.open(path).convert("L"))
    assert px.shape == (n * h, 4 * w)
    assert [int(px[0, c * w]) for c in range(4)] == [0, 50, 100, 150]  # input | truth | edit A | edit B


def test_write_grid_rejects_bad_input(tmp_path):
    a = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one shape"):
        write_grid(a, a, torch.zeros(2, 3, 8, 4, dtype=torch.uint8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        write_grid(a.float(), a.float(), a.float(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="one shape"):
        write_grid(a, a, [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="scale"):
        write_grid(a, a, a, tmp_path / "x.png", scale=0)


def test_reward_curve_png_from_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "reward/mean": 0.8 + 0.01 * s, "reward/flow/score": 0.8 + 0.01 * s} for s in range(12)]
    lines[5]["eval/score"] = 0.85
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # a blank line is ignored
    rows = ev.read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(12))
    path = ev.plot_reward_curve(rows, [(0, {"score": 0.8, "reward": 0.8}), (12, {"score": 0.9, "reward": 1.0})],
                                tmp_path / "out" / "reward_curve.png")  # fmt: skip
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (700, 400)  # figsize (7, 4) at 100 dpi
    assert np.asarray(image.convert("L")).std() > 10  # something was drawn


def test_read_metrics_names_the_bad_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "reward/mean": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        ev.read_metrics(metrics)
    metrics.write_text('{"reward/mean": 1}\n')
    with pytest.raises(ValueError, match="no 'step'"):
        ev.read_metrics(metrics)


# ------------------------------------------------------------------------------------------------ a tiny run


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    """A tiny flux run: 8 synthetic 32 px examples (half held out), DIS flow reward, no judge."""
    root = tmp_path_factory.mktemp("eval_run")
    path = write_config(root, kontext_run_tree(root))
    return path, load_config(path)


def test_checkpoint_resolution(run_config, tmp_path):
    path, _ = run_config
    cfg = load_config(path, [f"checkpoint.dir={tmp_path / 'empty'}"])
    assert ev.checkpoints_to_evaluate(cfg, "none") == [(None, None)]
    assert ev.checkpoints_to_evaluate(cfg, "all") == [(None, None)]  # only the base policy
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ev.checkpoints_to_evaluate(cfg, "latest")
    (tmp_path / "empty" / step_name(7) / "lora").mkdir(parents=True)  # not committed: never picked up
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ev.checkpoints_to_evaluate(cfg, "latest")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        ev.checkpoints_to_evaluate(cfg, str(tmp_path))


def test_loaded_adapter_is_the_exported_one(run_config):
    """load_policy (diffusers load_lora_weights) gives the same velocity as copying the weights in directly."""
    _, cfg = run_config
    state = adapter_state(cfg, seed=1)
    ckpt = write_checkpoint(cfg, 3, state)
    assert ev.checkpoints_to_evaluate(cfg, "latest") == [(3, str(ckpt / "lora"))]
    assert ev.checkpoints_to_evaluate(cfg, str(ckpt)) == [(3, str(ckpt / "lora"))]
    assert ev.checkpoints_to_evaluate(cfg, str(ckpt / "lora")) == [(3, str(ckpt / "lora"))]

    loaded = load_exported_policy(cfg, ckpt / "lora")
    direct = load_exported_policy(cfg, None)
    direct.add_lora(rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    direct.load_lora_state_dict(state)
    base = load_exported_policy(cfg, None)
    g = torch.Generator().manual_seed(0)
    cond = base.encode(["move the red square 4 pixels up"], torch.randint(0, 256, (1, 3, 32, 32), generator=g,
                                                                          dtype=torch.uint8))  # fmt: skip
    x = torch.randn(1, base.seq_len(32, 32), base.transformer.config.in_channels, generator=g)
    t = torch.tensor([0.6])
    v_loaded, v_direct, v_base = (p.velocity(x, t, cond) for p in (loaded, direct, base))
    assert (v_loaded - v_direct).abs().max().item() < 1e-6
    assert (v_loaded - v_base).abs().max().item() > 1e-3  # the adapter does something


def test_a_checkpoint_on_s3_is_read_by_the_worker_that_loads_it(run_config, s3_bucket, tmp_path):
    """checkpoint.dir on S3 (moto): `latest` and an s3:// dir resolve to the export's prefix without downloading
    anything on the driver; a rollout worker (the plain class) fetches only the export, on its own node, into a
    temporary dir it removes, and holds the same adapter as one loaded from the local export."""
    from actors.rollout import RolloutWorker
    from motionnft_core import s3
    from motionnft_core.models.policy import load_policy
    from motionnft_core.models.weights import LoraExport

    _, cfg = run_config
    state = adapter_state(cfg, seed=3)
    local = write_checkpoint(replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(tmp_path / "local"))), 5, state)
    (local / "learner").mkdir()
    (local / "learner" / "__0_0.distcp").write_bytes(b"learner shards, never needed to evaluate")
    root = f"s3://{s3_bucket}/run"
    upload_dir(local, f"{root}/{step_name(5)}")
    s3_cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=root),
                     model=replace(cfg.model, cache_dir=str(tmp_path / "cache")))  # fmt: skip
    lora = f"{root}/{step_name(5)}/lora"
    assert ev.checkpoints_to_evaluate(s3_cfg, "latest") == [(5, lora)]
    assert ev.checkpoints_to_evaluate(s3_cfg, f"{root}/{step_name(5)}/") == [(5, lora)]
    assert ev.checkpoints_to_evaluate(s3_cfg, lora) == [(5, lora)]
    with pytest.raises(FileNotFoundError, match="neither"):
        ev.checkpoints_to_evaluate(s3_cfg, f"{root}/step_00000009")
    assert not (tmp_path / "cache").exists()  # resolving downloads nothing

    worker_cache = str(tmp_path / "worker_node_cache")
    build = lambda: load_policy(cfg.model, use_gpu=False, lora=cfg.nft)  # noqa: E731 - as the evaluation pools build it
    rollout = replace(cfg.rollout, parity_check=False)
    worker = RolloutWorker("rollout-0", build, rollout, "lora")
    export = LoraExport(lora, RANK, ALPHA, worker_cache, s3.S3Retry(1, 0.01))
    worker.load_export(export)
    held = worker.weights.policy.lora_state_dict()
    reference = RolloutWorker("rollout-1", build, rollout, "lora")
    reference.load_export(LoraExport(str(local / "lora"), RANK, ALPHA, worker_cache))
    want = reference.weights.policy.lora_state_dict()
    assert held.keys() == want.keys() and all(torch.equal(held[k], want[k]) for k in want)
    assert list((Path(worker_cache) / "lora_exports").iterdir()) == []  # the download is gone after loading
    # A worker that does not hold the export (a restarted one starts with an empty adapter) loads it before it
    # edits: its edit is the one of a worker that held it already.
    example = compare.compare_examples(cfg, "", 1)[0]
    quick = replace(cfg.eval, num_steps=2)
    restarted = RolloutWorker("rollout-2", build, rollout, "lora")
    assert torch.equal(restarted.edit(quick, example, export=export), worker.edit(quick, example, export=export))
    assert restarted.export == lora and not torch.equal(restarted.edit(quick, example, base=True),
                                                        worker.edit(quick, example))  # fmt: skip


def test_rank_mismatch_names_the_config_keys(run_config, tmp_path):
    _, cfg = run_config
    state = adapter_state(cfg, seed=2)
    export_lora(state, tmp_path / "lora", family="flux_kontext", rank=RANK + 1, alpha=ALPHA, targets=TARGETS)
    with pytest.raises(ValueError, match="nft.lora_rank"):
        load_exported_policy(cfg, tmp_path / "lora")


def test_heldout_edits_and_scores_are_the_rollout_solvers_and_the_flow_reward(run_config):
    """What `heldout` measures on the pools, with the workers' plain classes: a rollout worker's held-out edit is
    exactly the training solver's single candidate of that row (the sampler in this process, same seed), seeded
    by `--seed` only; a reward worker's terms are the flow scorer's on that edit."""
    import asyncio

    from actors.rollout import RolloutWorker
    from actors.sampler import Sampler
    from motionnft_core.data.motionedit import load_splits
    from motionnft_core.models.policy import load_policy
    from rewards.flow_scorer import FLOW_TERMS, FlowItem, build_flow_scorer
    from rewards.scorer import build_reward_scorer
    from rewards.worker import RewardWorker

    _, cfg = run_config
    _, held = load_splits(cfg)
    examples = [held[i] for i in range(min(2, len(held)))]
    build = lambda: load_policy(cfg.model, use_gpu=False, lora=cfg.nft)  # noqa: E731 - as the evaluation pools build it
    worker = RolloutWorker("rollout-0", build, replace(cfg.rollout, parity_check=False), "lora")
    how = ev.heldout_sampling(cfg.rollout, seed=0)
    edits = [worker.edit(how, e, base=True) for e in examples]
    assert all(e.shape == (3, 32, 32) and e.dtype == torch.uint8 for e in edits)
    in_process = Sampler(load_exported_policy(cfg, None), how).sample(examples, step=0, version=0, group_size=1)
    assert all(torch.equal(edit, images[0]) for edit, (_, images) in zip(edits, in_process, strict=True))
    assert torch.equal(worker.edit(how, examples[0], base=True), edits[0])  # the same row, the same edit
    assert not torch.equal(worker.edit(ev.heldout_sampling(cfg.rollout, seed=1), examples[0], base=True), edits[0])

    scored = replace(cfg.reward, flow_weight=1.0, judge_weight=0.0)
    reward = RewardWorker(lambda: build_reward_scorer(scored, (), device="cpu", cache_dir=cfg.model.cache_dir))
    terms = asyncio.run(reward.score_flow(*examples, *edits))
    scorer = build_flow_scorer(cfg.reward.flow, device="cpu", cache_dir=cfg.model.cache_dir)
    direct = scorer.score([FlowItem(e.id, e.input_image, e.target_image, edit[None])
                           for e, edit in zip(examples, edits, strict=True)])  # fmt: skip
    assert [sorted(t) for t in terms] == [sorted(FLOW_TERMS)] * len(examples)
    assert [t["score"] for t in terms] == [float(r["score"][0]) for r in direct]
    assert all(t["reward"] == t["score"] and 0.0 <= t["score"] <= 1.0 for t in terms)  # unquantized config
    with pytest.raises(ValueError, match="n rows then their n edits"):
        asyncio.run(reward.score_flow(*examples, edits[0]))


def test_cli_reports_config_errors(run_config, capsys):
    path, _ = run_config
    with pytest.raises(SystemExit) as exit_:
        cli.main(["heldout", "--config", str(path), "rollout.heigth=64"])
    assert exit_.value.code == 2 and "rollout.heigth" in capsys.readouterr().err


def test_cli_run_dir_refusals_print_a_message(run_config, tmp_path, capsys):
    from motionnft_core.config_loader import config_to_dict

    _, cfg = run_config
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))  # as the driver writes it
    assert cli.main(["heldout", "--run", str(tmp_path / "nothing")]) == 2  # a message, no traceback
    assert "no config.json" in capsys.readouterr().err
    argv = ["heldout", "--run", str(run_dir), "--checkpoint", "latest", f"checkpoint.dir={tmp_path / 'none'}"]
    assert cli.main(argv) == 2
    assert "--checkpoint latest: no complete checkpoint under" in capsys.readouterr().err


def test_a_refused_comparison_writes_nothing_and_the_corrected_one_starts(run_config, tmp_path, capsys, monkeypatch):
    """Every input of `compare` is checked before a file is written or Ray is joined: a refused start leaves no
    trace in --out, so the corrected command is not refused as "another comparison"."""
    path, cfg = run_config
    ckpt_dir = tmp_path / "ckpt"
    write_checkpoint(replace(cfg, checkpoint=replace(cfg.checkpoint, dir=str(ckpt_dir))), 7,
                      adapter_state(cfg, seed=4))  # fmt: skip
    out = tmp_path / "compare"
    argv = ["compare", "--config", str(path), "--checkpoint", "latest", "--baseline", "base", "--out", str(out),
            f"checkpoint.dir={ckpt_dir}"]  # fmt: skip
    refused = {
        "the rubric needs a judge: reward.judge.url": [],
        "cluster.judge_replicas is 0": ["reward.judge.tiny=true", "cluster.judge_replicas=0"],
        "--checkpoint latest: no complete checkpoint": ["reward.judge.tiny=true", f"checkpoint.dir={tmp_path / 'no'}"],
        "no *.parquet, *.jsonl or example folders": ["reward.judge.tiny=true", f"--split={tmp_path / 'empty'}"],
    }
    (tmp_path / "empty").mkdir()
    for message, extra in refused.items():
        flags = [a for a in extra if a.startswith("--")]
        assert cli.main([*argv[:1], *flags, *argv[1:], *[a for a in extra if a not in flags]]) == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists(), message

    class PoolsReached(Exception):
        pass

    def pools(cfg, *, rubric):  # stands for the Ray pools: the corrected command gets this far, and no further
        assert rubric
        raise PoolsReached

    monkeypatch.setattr(compare, "evaluation_pools", pools)
    with pytest.raises(PoolsReached):
        cli.main([*argv, "reward.judge.tiny=true"])
    assert not out.exists()  # the manifest is written once the pools are up
    out.mkdir()
    (out / compare.MANIFEST).write_text(json.dumps({"candidate": "another"}))
    assert cli.main([*argv, "reward.judge.tiny=true"]) == 2
    assert "holds a comparison with other" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [compare.MANIFEST]


def test_the_demo_config_carries_the_comparisons_judge_and_training_starts_none():
    """`compare --run runs/learn_demo` needs no override, and the demo's training is as before: no judge pool
    asked for, no replica started (its reward.judge_weight is 0)."""
    from learner.driver.placement import pool_asks
    from learner.driver.pools import start_judges
    from motionnft_core.secret import secret_from_env

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "learn_demo.yaml")
    compare.check_judge(cfg)
    assert cfg.reward.judge.tiny and cfg.cluster.judge_replicas == 1 and cfg.cluster.judge_gpus == 0
    assert cfg.reward.judge_weight == 0.0
    assert [p.name for p in pool_asks(cfg)] == ["learner", "rollout", "reward"]
    assert start_judges(cfg, secret_from_env(cfg.reward.judge.api_key_env, generate=True), local=True) == []
