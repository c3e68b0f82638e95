"""Both evaluation commands for the newer policy families (Qwen-Image-Edit-Plus, FLUX.2 [klein] and [dev]) on the
Ray pools of the session's cluster, with a second input image per row: `heldout` scores the base policy with the
flow reward, `compare` of the base policy against itself makes its edits with the family's own evaluation settings
(guidance or true CFG), judges them and ties every row. The first two families run the same commands in
tests/ray/test_evaluate_heldout.py and test_evaluate_compare.py."""

from __future__ import annotations

import json

import pytest

from evaluation import main as cli
from tests.eval_runs import cpu_pools, write_config

pytestmark = pytest.mark.slow  # about 30 s a family; the fast loop keeps the first two families' evaluation tests


@pytest.mark.parametrize("family", ["qwen_image_edit_plus", "flux2_klein", "flux2_dev"])
def test_heldout_and_compare_run_for_the_family(family, ray_cluster, vllm_judge, tmp_path, capsys):
    tree = {
        "model": {"tiny": True, "family": family, "dtype": "float32", "cache_dir": str(tmp_path / "cache")},
        "data": {"synthetic": 8, "synthetic_size": 32, "synthetic_reference": True, "eval_fraction": 0.5},
        "rollout": {"group_size": 2, "prompts_per_step": 1, "num_steps": 2, "height": 32, "width": 32},
        "reward": {"flow_weight": 1.0, "judge_weight": 0.0, "flow": {"estimator": "dis"},
                   "judge": {"url": vllm_judge.url, "max_model_len": 2048}},
        "eval": {"num_steps": 2, "bootstrap_samples": 100},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "logging": {"dir": str(tmp_path / "run")},
        "cluster": cpu_pools(1, judge=True),
    }  # fmt: skip
    path = write_config(tmp_path, tree)
    assert cli.main(["heldout", "--config", str(path), "--checkpoint", "none", "--limit", "1"]) == 0
    held = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert held["n_examples"] == 1 and 0.0 <= held["results"][0]["mean"]["score"] <= 1.0
    argv = ["compare", "--config", str(path), "--checkpoint", "base", "--baseline", "base", "--limit", "1"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "compare" / "summary.json").read_text())["all"]["metrics"]
    assert summary["mas"] == summary["baseline_mas"]  # the same policy on both sides: one set of edits
    for key in ("win_mas", "win_overall"):
        assert summary[key]["mean"] == 0.5, key
    assert 0.0 <= summary["overall"]["mean"] <= 5.0  # the judge scored the row (a failed row has no overall)
    capsys.readouterr()
