"""Camera-compensated motion reward (reward.flow.camera_compensation) on synthetic flows: a pure pan leaves no object
motion, object motion plus a pan (or a rotation, or a zoom) scores as the object motion alone, the camera part is
logged, and camera_penalty charges only the camera motion beyond the ground truth's."""

import pytest
import torch

from motionnft_core.config import FlowRewardConfig
from motionnft_core.global_motion import affine_flow
from rewards.flow_reward import compensate, motion_alignment_reward
from rewards.flow_scorer import reward_constants

H = W = 64
TOL = 1e-4  # the affine fit is iterative: a camera removed to about 1e-5 px


def object_flow(dx: float = 6.0) -> torch.Tensor:
    """A 16 x 16 object moving dx px right in a still frame (the issue's measured case), (1, H, W, 2)."""
    flow = torch.zeros(1, H, W, 2)
    flow[0, 24:40, 24:40, 0] = dx
    return flow


def camera(kind: str) -> torch.Tensor:
    """A global flow (1, H, W, 2): a 6 px pan, a small rotation or a zoom (affine params on the normalised grid)."""
    params = {"pan": [[0.0, 0.0, 6.0], [0.0, 0.0, 0.0]],
              "rotation": [[0.0, -3.0, 0.0], [3.0, 0.0, 0.0]],
              "zoom": [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]}[kind]  # fmt: skip
    return affine_flow(torch.tensor([params]), H, W)


def reward(v_pred, v_gt, **kw):
    return motion_alignment_reward(v_pred, v_gt, quantize=False, **kw)


def test_the_issues_case_on_raw_flows_is_what_the_lever_answers():
    """Raw flows: the right object motion plus a pan scores below a pan alone and below no edit at all."""
    gt = object_flow()
    both, pan, still = reward(gt + camera("pan"), gt), reward(camera("pan"), gt), reward(torch.zeros_like(gt), gt)
    assert both["score"] < pan["score"] < still["score"]
    comp = {k: reward(v, gt, camera_compensation=True)["score"] for k, v in
            (("both", gt + camera("pan")), ("pan", camera("pan")), ("still", torch.zeros_like(gt)))}  # fmt: skip
    assert comp["both"] == pytest.approx(1.0, abs=TOL) and comp["both"] > comp["pan"] and comp["both"] > comp["still"]


def test_a_pure_pan_leaves_zero_object_motion():
    obj_pred, obj_gt, parts = compensate(camera("pan"), object_flow())
    assert obj_pred.abs().max() < TOL
    assert torch.allclose(obj_gt, object_flow(), atol=TOL)  # the object is a minority: no camera in the truth
    assert parts["camera"].item() == pytest.approx(6.0 / (H * 2**0.5), rel=1e-4)  # in diagonals


@pytest.mark.parametrize("kind", ["pan", "rotation", "zoom"])
def test_object_motion_plus_a_global_motion_scores_as_the_object_motion_alone(kind):
    gt = object_flow()
    half = object_flow(3.0)  # half the object's motion: a score below 1 that must not move either
    for pred in (gt, half):
        alone = reward(pred, gt, camera_compensation=True)
        moved = reward(pred + camera(kind), gt, camera_compensation=True)
        for key in ("l_q", "direction", "move", "score"):
            assert moved[key].item() == pytest.approx(alone[key].item(), abs=TOL), key
    assert reward(half, gt, camera_compensation=True)["score"] < 0.999


def test_camera_penalty_charges_only_camera_motion_beyond_the_truths():
    gt = object_flow() + camera("pan")  # the ground truth itself pans 6 px
    same = reward(gt, gt, camera_compensation=True, camera_penalty=2.0)
    more = reward(object_flow() + 2 * camera("pan"), gt, camera_compensation=True, camera_penalty=2.0)
    free = reward(object_flow() + 2 * camera("pan"), gt, camera_compensation=True)
    assert same["camera_excess"].item() == pytest.approx(0.0, abs=TOL)
    excess = 6.0 / (H * 2**0.5)
    assert more["camera_excess"].item() == pytest.approx(excess, rel=1e-3)
    assert more["distance"].item() == pytest.approx(free["distance"].item() + 2.0 * excess, rel=1e-4)


def test_off_adds_nothing_and_the_config_turns_it_on():
    gt = object_flow()
    assert set(reward(gt, gt)) == {"l_q", "direction", "move", "distance", "score", "reward"}
    assert "camera_compensation" not in reward_constants(FlowRewardConfig())
    on = reward_constants(FlowRewardConfig(camera_compensation=True, camera_penalty=0.5))
    assert on["camera_compensation"] is True and on["camera_penalty"] == 0.5


def test_heldout_scoring_adds_mas_and_the_camera_compensated_mas_beside_it():
    """The reward worker's held-out scoring (evaluation.main heldout): MAS as published always, the object-motion
    MAS only for a run whose reward compensates camera motion."""
    import asyncio
    from types import SimpleNamespace

    from motionnft_core.config import EvalConfig, RewardConfig
    from rewards.flow_scorer import FLOW_TERMS, FlowRewardScorer
    from rewards.mas import camera_compensated_mas, mas_constants, motion_alignment_score
    from rewards.scorer import RewardScorer
    from rewards.worker import RewardWorker
    from tests.unit.golden.make_golden import PixelFlow, flow_items

    items = flow_items()
    rows = [SimpleNamespace(id=it.prompt_id, input_image=it.input, target_image=it.target) for it in items]
    edits = [it.candidates[2] for it in items]
    mas = mas_constants(EvalConfig())
    flow_only = RewardConfig(flow_weight=1.0, judge_weight=0.0)
    for compensated in (False, True):
        flow = FlowRewardConfig(camera_compensation=compensated)
        worker = RewardWorker(lambda flow=flow: RewardScorer(FlowRewardScorer(PixelFlow(), flow), [], flow_only))
        out = asyncio.run(worker.score_flow(*rows, *edits, mas=mas))
        extra = {"mas", "mas_camera_compensated"} if compensated else {"mas"}
        assert [set(r) for r in out] == [set(FLOW_TERMS) | extra] * len(items)
        for row, item, edit in zip(out, items, edits, strict=True):
            v_pred, v_gt = PixelFlow()(item.input[None], edit[None]), PixelFlow()(item.input[None], item.target[None])
            assert row["mas"] == float(motion_alignment_score(v_pred, v_gt, **mas)["mas"][0])
            if compensated:
                assert row["mas_camera_compensated"] == float(camera_compensated_mas(v_pred, v_gt, **mas)[0])
    assert [set(r) for r in asyncio.run(worker.score_flow(*rows, *edits))] == [set(FLOW_TERMS)] * len(items)


def test_the_comparisons_mas_gets_the_camera_compensated_term_only_for_such_a_run():
    import asyncio
    from types import SimpleNamespace

    from motionnft_core.config import EvalConfig
    from rewards.eval_scorer import EvalScorer
    from rewards.flow_scorer import FlowRewardScorer
    from tests.unit.golden.make_golden import PixelFlow, flow_items

    items = flow_items()
    rows = [SimpleNamespace(id=it.prompt_id, prompt="move", input_image=it.input, target_image=it.target)
            for it in items]  # fmt: skip
    edits = [it.candidates[0] for it in items]
    scored = {}
    for on in (False, True):
        scorer = EvalScorer(FlowRewardScorer(PixelFlow(), FlowRewardConfig(camera_compensation=on)), None)
        scored[on] = asyncio.run(scorer.score(rows, edits, EvalConfig()))
    assert all("mas_camera_compensated" not in r["mas"] for r in scored[False])
    assert all(r["mas"]["mas_camera_compensated"] >= 0.0 for r in scored[True])
    assert [r["mas"]["mas"] for r in scored[True]] == [r["mas"]["mas"] for r in scored[False]]  # as published
