"""The golden outputs of the reward and the loss on seeded inputs, as they were before the motion levers
(docs/algorithm.md): every lever off must reproduce them bit for bit (tests/unit/test_golden.py).

Run `python -m tests.unit.golden.make_golden` from the repository root to write them again; only ever on purpose,
for a change that is meant to alter the reward or the loss, and say so in the commit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from learner.trainer.nft_loss import nft_loss
from motionnft_core.config import EvalConfig, FlowRewardConfig, RewardConfig
from rewards.flow_reward import motion_alignment_reward
from rewards.flow_scorer import FlowItem, FlowRewardScorer
from rewards.mas import mas_constants, motion_alignment_score
from rewards.scorer import GroupReward, RewardScorer

HERE = Path(__file__).resolve().parent
FILES = {"flow_reward": "flow_reward.pt", "mas": "mas.pt", "flow_scorer": "flow_scorer.pt", "nft_loss": "nft_loss.pt"}


def flow_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """(V_pred, V_gt) pixel flows (6, 24, 32, 2): random fields, an exact match, a still prediction, a pan, a
    half motion, a still target, so every branch of the reward and of MAS is taken."""
    g = torch.Generator().manual_seed(1234)
    v_gt = torch.zeros(6, 24, 32, 2)
    v_gt[:, 8:16, 10:20, 0] = 3.0  # an object moving 3 px right
    v_gt[0] = torch.randn(24, 32, 2, generator=g) * 2.0
    v_gt[5] = 0.0
    v_pred = torch.randn(6, 24, 32, 2, generator=g)
    v_pred[0] *= 8.0
    v_pred[1] = v_gt[1]
    v_pred[2] = 0.0
    v_pred[3] = v_gt[3] + torch.tensor([2.0, 0.0])
    v_pred[4] = v_gt[4] / 2
    return v_pred, v_gt


def reward_outputs() -> dict[str, torch.Tensor]:
    v_pred, v_gt = flow_pairs()
    out = motion_alignment_reward(v_pred, v_gt)
    raw = motion_alignment_reward(v_pred, v_gt, quantize=False)
    return {**out, "score_unquantized": raw["reward"]}


def mas_outputs() -> dict[str, torch.Tensor]:
    v_pred, v_gt = flow_pairs()
    return motion_alignment_score(v_pred, v_gt, **mas_constants(EvalConfig()))


class PixelFlow:
    """A deterministic stand-in for the flow estimator: a pure function of both images (B, 3, H, W) uint8 ->
    (B, H, W, 2), so the scorer's batching, caching and blending are what the golden pins."""

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        diff = dst.float() - src.float()  # (B, 3, H, W)
        return torch.stack([diff[:, 0] / 40.0, (diff[:, 1] - diff[:, 2]) / 60.0], dim=-1)


def flow_items() -> list[FlowItem]:
    g = torch.Generator().manual_seed(99)
    items = []
    for p, (h, w) in enumerate(((32, 32), (32, 48))):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        target = image.roll(3, dims=2)
        candidates = torch.stack([image.roll(s, dims=2) for s in (3, 0, 1, -3)])
        candidates[3, :, :8] = torch.randint(0, 256, (3, 8, w), generator=g, dtype=torch.uint8)
        items.append(FlowItem(f"p{p}", image, target, candidates))
    return items


def score_groups(scorer: RewardScorer, items: list[FlowItem]) -> list[GroupReward]:
    """Each item's group through the reward scorer (instruction "move"), in order; the scorer is closed after."""

    async def run() -> list[GroupReward]:
        try:
            return [await scorer.score(it.prompt_id, "move", it.input, it.target, it.candidates) for it in items]
        finally:
            await scorer.close()

    return asyncio.run(run())


def scorer_outputs() -> dict[str, torch.Tensor]:
    """The flow scorer's batch (per item, per key) and the reward scorer's blended group reward (flow only)."""
    items = flow_items()
    out: dict[str, torch.Tensor] = {}
    for i, result in enumerate(FlowRewardScorer(PixelFlow(), FlowRewardConfig(max_batch=3)).score(items)):
        out.update({f"item{i}/{k}": v for k, v in result.items()})

    scorer = RewardScorer(FlowRewardScorer(PixelFlow(), FlowRewardConfig()), [],
                          RewardConfig(flow_weight=0.5, judge_weight=0.0))  # fmt: skip
    for i, group in enumerate(score_groups(scorer, items)):
        out[f"group{i}/reward"] = torch.tensor(group.reward, dtype=torch.float64)
        out.update({f"group{i}/{k}": torch.tensor(v, dtype=torch.float64) for k, v in group.components.items()})
    return out


def loss_inputs() -> dict[str, torch.Tensor]:
    """A micro-batch of 4 samples of 8 tokens x 6 channels; sample 2 is invalid."""
    g = torch.Generator().manual_seed(7)
    shape = (4, 8, 6)
    return {
        "v_theta": torch.randn(shape, generator=g), "v_old": torch.randn(shape, generator=g),
        "v_ref": torch.randn(shape, generator=g), "x_t": torch.randn(shape, generator=g),
        "x0": torch.randn(shape, generator=g), "t": torch.rand(4, generator=g),
        "r": torch.tensor([0.9, 0.1, 0.5, 0.7], dtype=torch.float64),
        "valid": torch.tensor([True, True, False, True]),
    }  # fmt: skip


def loss_outputs(**levers) -> dict[str, torch.Tensor]:
    """The loss, its metrics and the gradient it gives v_theta; `levers` are extra keyword arguments of nft_loss."""
    x = loss_inputs()
    v_theta = x.pop("v_theta").requires_grad_(True)
    loss, metrics = nft_loss(v_theta, *x.values(), beta=0.8, **levers)
    loss.backward()
    return {"loss": loss.detach(), **{f"metric/{k}": v for k, v in metrics.items()}, "grad_v_theta": v_theta.grad}


def outputs() -> dict[str, dict[str, torch.Tensor]]:
    return {"flow_reward": reward_outputs(), "mas": mas_outputs(), "flow_scorer": scorer_outputs(),
            "nft_loss": loss_outputs()}  # fmt: skip


def main() -> None:
    for name, values in outputs().items():
        torch.save(values, HERE / FILES[name])
        print(f"wrote {HERE / FILES[name]} ({len(values)} tensors)")


if __name__ == "__main__":
    main()
