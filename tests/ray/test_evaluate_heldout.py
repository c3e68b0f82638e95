"""`python -m evaluation.main heldout ...` on the Ray pools of the session's cluster (edits by rollout workers
with the rollout solver, the flow reward on a reward worker, no judge): tiny FLUX Kontext, DIS flow. The numbers
are those of the same edits made and scored in this process; every actor the command started is gone after it."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from PIL import Image

from actors.sampler import Sampler
from evaluation import heldout as ev
from evaluation import main as cli
from evaluation.report import LABEL_BAND
from motionnft_core.config_loader import config_to_dict, load_config
from motionnft_core.data.motionedit import load_splits
from motionnft_core.models.weights import load_exported_policy
from rewards.flow_scorer import FlowItem, build_flow_scorer
from tests.eval_runs import adapter_state, cpu_pools, kontext_run_tree, write_checkpoint, write_config


@pytest.fixture(scope="module")
def heldout_config(tmp_path_factory):
    """A tiny run: 8 synthetic 32 px examples (about half held out), a 2-step solver, one checkpoint with a random
    (non-zero) adapter, two rollout workers and one reward worker."""
    root = tmp_path_factory.mktemp("heldout_run")
    path = write_config(root, kontext_run_tree(root) | {"cluster": cpu_pools(2)})
    cfg = load_config(path)
    ckpt = write_checkpoint(cfg, 5, adapter_state(cfg, seed=3))
    return path, cfg, ckpt


def _alive_actors() -> int:
    return sum(a["State"] != "DEAD" for a in ray._private.state.actors().values())


@pytest.mark.slow  # the CLI on the pools, every checkpoint: one of the fast loop's longest tests (CI runs it)
def test_heldout_on_the_pools_scores_what_the_process_would(heldout_config, ray_cluster, capsys):
    path, cfg, ckpt = heldout_config
    before = _alive_actors()
    run_dir = Path(cfg.logging.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n"
                                                   for s in range(6)))  # fmt: skip
    out = run_dir / "eval_out"
    argv = ["heldout", "--config", str(path), "--checkpoint", "all", "--out", str(out), "--grid-scale", "2",
            "--limit", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "eval.json").read_text())
    n = summary["n_examples"]
    assert n == min(3, len(load_splits(cfg)[1])) and n >= 2
    assert "base policy (no adapter)" in printed and f"MEAN (n={n})" in printed
    assert [r["step"] for r in summary["results"]] == [None, 5]  # base first, then the checkpoint
    assert summary["grid_columns"] == ["input", "ground truth", "edit: base policy", "edit: step 5"]
    for res in summary["results"]:
        assert res["mean"]["score"] == pytest.approx(sum(res["components"]["score"]) / n, abs=1e-12)
    assert Image.open(out / "grid.png").size == (4 * 32 * 2, LABEL_BAND + n * 32 * 2)
    assert Image.open(out / "reward_curve.png").format == "PNG"

    # The same edits made and scored in this process: the export loaded by diffusers' own loader, the rollout
    # solver with the seed of `--seed` (0), the run's flow scorer.
    _, held = load_splits(cfg)
    examples = [held[i] for i in range(n)]
    scorer = build_flow_scorer(cfg.reward.flow, device="cpu", cache_dir=cfg.model.cache_dir)
    how = ev.heldout_sampling(cfg.rollout, seed=0)
    for res, lora in zip(summary["results"], (None, ckpt / "lora"), strict=True):
        pairs = Sampler(load_exported_policy(cfg, lora), how).sample(examples, step=0, version=0, group_size=1)
        direct = scorer.score([FlowItem(e.id, e.input_image, e.target_image, images)
                               for e, (_, images) in zip(examples, pairs, strict=True)])  # fmt: skip
        assert res["ids"] == [e.id for e in examples]
        assert res["components"]["score"] == pytest.approx([float(r["score"][0]) for r in direct], abs=1e-5)
    assert summary["results"][0]["components"]["score"] != summary["results"][1]["components"]["score"]

    # --run: the saved resolved config, overrides on top; one evaluation and no metrics: no curve.
    saved = run_dir.parent / "saved_run"
    saved.mkdir()
    other = replace(cfg, logging=replace(cfg.logging, dir=str(saved / "logs")))
    (saved / "config.json").write_text(json.dumps(config_to_dict(other), indent=1))
    out2 = saved / "out"
    argv = ["heldout", "--run", str(saved), "--checkpoint", "none", "--out", str(out2), "--limit", "1",
            "cluster.rollout_workers=1"]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads((out2 / "eval.json").read_text())["n_examples"] == 1
    assert "reward_curve.png not written" in capsys.readouterr().out
    assert not (out2 / "reward_curve.png").exists()
    deadline = time.monotonic() + 10
    while _alive_actors() != before and time.monotonic() < deadline:  # ray.kill returns before the actor is gone
        time.sleep(0.2)
    assert _alive_actors() == before  # every actor the command started is stopped
