"""bench/ablation_levers.py's statistics on hand-made run directories (no training): the MAS gain of a lever over the
plain recipe is paired by seed and row, its interval decides "helps", and the table and JSON say so."""

import json

import pytest

from bench import ablation_levers as ab


def write_run(root, name, mas, base_mas, metrics=None):
    run = root / name
    (run / "eval").mkdir(parents=True)
    ids = [f"r{i}" for i in range(len(mas))]
    flow = {"reward": [0.5] * len(mas), "score": [0.8] * len(mas), "l_q": [0.1] * len(mas),
            "direction": [0.2] * len(mas), "move": [0.0] * len(mas), "distance": [0.1] * len(mas)}  # fmt: skip
    results = [{"step": None, "ids": ids, "components": {**flow, "mas": base_mas}},
               {"step": 30, "ids": ids, "components": {**flow, "mas": mas}}]  # fmt: skip
    (run / "eval" / "eval.json").write_text(json.dumps({"results": results}))
    lines = [{"step": s, **(metrics or {})} for s in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_a_lever_that_gains_on_every_row_helps_and_one_that_does_not_is_said_so(tmp_path):
    base = [50.0, 60.0, 70.0, 80.0]
    for seed in (0, 1):
        write_run(tmp_path, f"baseline_seed{seed}", base, base)
        write_run(tmp_path, f"preservation_seed{seed}", [m + 2.0 for m in base], base,
                  {"reward/preservation/score": 0.9})  # fmt: skip
        write_run(tmp_path, f"motion_focal_seed{seed}", [m + (1.0 if i % 2 else -1.0) for i, m in enumerate(base)],
                  base)  # fmt: skip
    out = tmp_path / "results"
    ab.main(["--variants", "baseline", "preservation", "motion_focal", "--seeds", "0", "1", "--work", str(tmp_path),
             "--out", str(out), "--summarize-only"])  # fmt: skip
    summary = json.loads((out / "ablation_levers.json").read_text())["summary"]
    pres, focal = summary["preservation"], summary["motion_focal"]
    assert pres["mas_gain"] == {"mean": 2.0, "low": 2.0, "high": 2.0} and pres["helps"] and not pres["hurts"]
    assert pres["win_rate"]["mean"] == 1.0 and pres["rows"] == 8 and pres["paired_seeds"] == [0, 1]
    assert pres["metrics"] == {"reward/preservation/score": pytest.approx(0.9)}
    assert focal["mas_gain"]["mean"] == 0.0 and focal["mas_gain"]["low"] < 0 < focal["mas_gain"]["high"]
    assert not focal["helps"] and focal["win_rate"]["mean"] == 0.5
    table = (out / "ablation_levers.md").read_text()
    assert "| preservation | 2 |" in table and "helps" in table and "not shown" in table


def test_rows_that_differ_from_the_baselines_are_refused(tmp_path):
    write_run(tmp_path, "baseline_seed0", [50.0, 60.0], [50.0, 60.0])
    write_run(tmp_path, "camera_seed0", [50.0, 60.0, 70.0], [50.0, 60.0, 70.0])
    with pytest.raises(ValueError, match="held-out rows differ"):
        ab.main(["--variants", "camera", "--seeds", "0", "--work", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--summarize-only"])  # fmt: skip
