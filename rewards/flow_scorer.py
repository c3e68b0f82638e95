"""Batched motion-alignment scoring: the path the reward worker calls (docs/algorithm.md).

For a micro-batch of groups (one `FlowItem` per prompt, K candidates each) the scorer
1. checks the images and resizes each ground-truth target to the input size if it differs,
2. collects the flow pairs still needed: input -> target once per prompt (unless cached) and input -> candidate
   for every candidate of every item,
3. runs the estimator on all pairs of one image size in chunks of <= max_batch pairs (target pairs ride in the
   same chunks as candidate pairs, so the number of estimator calls is the minimum, ceil(pairs / max_batch)),
4. caches the new input -> target flows (LRU, on the CPU) and scores each item with `motion_alignment_reward`.

Sizes: the candidates of an item must have the input's H x W (the policy edits at the input's resolution; a
mismatch is an upstream bug and raises ValueError). The target may differ: it is resized to the input
(= candidate) size with bilinear interpolation (align_corners=False, no antialias, rounded back to uint8),
as the reference scorer resizes its ground truth to the candidate's size.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from motionnft_core.config import FlowRewardConfig, RewardConfig
from rewards.flow_model import FlowEstimator, build_flow_estimator
from rewards.flow_reward import motion_alignment_reward
from rewards.preservation import preservation_score, static_mask

BACKWARD = "target->input"  # the cache key's tail of a prompt's backward ground-truth flow


def reward_constants(cfg: FlowRewardConfig) -> dict[str, float | bool]:
    """`reward.flow.*` as the keyword arguments of `motion_alignment_reward` (the formulas' names)."""
    out = {"q": cfg.q, "m": cfg.motion_threshold, "tau": cfg.tau, "kappa": cfg.kappa, "a": cfg.w_magnitude,
           "b": cfg.w_direction, "c": cfg.w_move, "quantize": cfg.quantize}  # fmt: skip
    if cfg.camera_compensation:
        out.update(camera_compensation=True, camera_penalty=cfg.camera_penalty)
    return out


FLOW_TERMS = ("reward", "score", "l_q", "direction", "move", "distance")  # what `score` returns per candidate


def motion_heat(v_gt: torch.Tensor) -> torch.Tensor:
    """|V_gt| per pixel, float32 (H, W): the ground-truth motion the motion-focal loss weights tokens by."""
    return torch.linalg.vector_norm(v_gt.float(), dim=-1)


def preservation_constants(cfg: RewardConfig) -> dict[str, float] | None:
    """`reward.preservation_*` for the flow scorer; None when `reward.preservation_weight` is 0 (the term is off)."""
    if cfg.preservation_weight == 0:
        return None
    return {"weight": cfg.preservation_weight, "threshold": cfg.preservation_threshold, "grid": cfg.preservation_grid}


@dataclass(frozen=True)
class FlowItem:
    """One prompt's images: `prompt_id` must identify the (input, target) pair, it keys the flow cache.

    input: uint8 (3, H, W); target: uint8 (3, H', W'); candidates: uint8 (K, 3, H, W).
    """

    prompt_id: str
    input: torch.Tensor
    target: torch.Tensor
    candidates: torch.Tensor


@dataclass
class _Pair:
    """One estimator job: flow src -> dst, and where its result goes (a cache key or a candidate slot)."""

    src: torch.Tensor  # (3, H, W) uint8
    dst: torch.Tensor
    cache_key: tuple | None = None
    item_index: int = -1
    candidate_index: int = -1


class FlowRewardScorer:
    """Scores candidates of many prompts with as few flow-estimator calls as possible (`reward.flow`).

    `max_batch`: most pairs per estimator call (32 at 512² on an H100, docs/algorithm.md). `cache_size`: input -> target
    flows kept (LRU, float32 on the CPU: H·W·8 bytes each, 2 MiB at 512²). The reward constants are the published ones
    (docs/algorithm.md). Counters for metrics: `estimator_calls`, `pairs_estimated`, `cache_hits`, `cache_misses`.
    `preservation`: the static-region term's constants (`preservation_constants`); it adds the target -> input flow
    of each prompt (cached beside input -> target) to the pairs. `heat`: each result carries its prompt's
    ground-truth motion magnitude (H, W) in pixels, from the cached target flow (`motion_heat`).
    """

    def __init__(self, estimator: FlowEstimator, cfg: FlowRewardConfig, *, preservation: dict | None = None,
                 heat: bool = False):  # fmt: skip
        self.estimator, self.max_batch, self.cache_size = estimator, cfg.max_batch, cfg.cache_size
        self.reward_constants = reward_constants(cfg)
        self.preservation = preservation  # `preservation_constants(reward)`: None = the term is off
        self.heat = heat  # nft.motion_focal: each item's |input -> target flow| (H, W) comes with its scores
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # key -> (H, W, 2)
        self.estimator_calls = self.pairs_estimated = self.cache_hits = self.cache_misses = 0

    def counters(self) -> dict[str, int]:
        return {"estimator_calls": self.estimator_calls, "pairs_estimated": self.pairs_estimated,
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses}  # fmt: skip

    def score(self, items: list[FlowItem]) -> list[dict[str, torch.Tensor]]:
        """Per item, a dict of (K,) CPU tensors: l_q, direction, move, distance, score, reward; with camera
        compensation also `camera` and `camera_excess`; with the preservation term on (`reward.preservation_weight`)
        also `preservation` (r_pres) and `static_share`; with `heat`, the prompt's `heat` (H, W)."""
        results = []
        for item, (v_pred, v_gt, v_back) in zip(items, self._flows(items, backward=self.preservation is not None),
                                                strict=True):  # fmt: skip
            out = motion_alignment_reward(v_pred, v_gt, **self.reward_constants)
            if v_back is not None:
                out.update(self._preservation(item, v_gt[0], v_back))
            if self.heat:
                out["heat"] = motion_heat(v_gt[0])
            results.append({name: value.cpu() for name, value in out.items()})
        return results

    def _preservation(self, item: FlowItem, v_gt: torch.Tensor, v_back: torch.Tensor) -> dict[str, torch.Tensor]:
        """r_pres of the item's candidates (rewards/preservation.py) and the static share of its ground truth."""
        spec = self.preservation
        static = static_mask(v_gt[None], v_back[None], threshold=spec["threshold"])[0]
        r_pres, share = preservation_score(item.candidates, item.input, static.cpu(), grid=spec["grid"])
        return {"preservation": r_pres, "static_share": share}

    def flows(self, items: list[FlowItem]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per item, (V_pred, V_gt) pixel flows, both (K, H, W, 2): input -> each candidate and input -> target
        (the cached flow, expanded), for any score of them (the training reward, the evaluation's MAS)."""
        return [(v_pred, v_gt) for v_pred, v_gt, _ in self._flows(items, backward=False)]

    def _flows(self, items: list[FlowItem], *, backward: bool
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:  # fmt: skip
        """`flows`, and with `backward` each item's target -> input flow (H, W, 2), cached like input -> target."""
        # 1. Check inputs; bring each target to its input's size.
        targets = [_check_item(item) for item in items]

        # 2. Collect the pairs: missing ground-truth flows (each key once), then every candidate.
        pairs: list[_Pair] = []
        gt_flows: dict[tuple, torch.Tensor] = {}
        pending: set[tuple] = set()
        for item, target in zip(items, targets, strict=True):
            wanted = [(_cache_key(item), item.input, target)]
            if backward:
                wanted.append((_cache_key(item) + (BACKWARD,), target, item.input))
            for key, src, dst in wanted:
                if key in gt_flows or key in pending:
                    continue
                cached = self._cache_get(key)
                if cached is not None:
                    gt_flows[key] = cached
                else:
                    pending.add(key)
                    pairs.append(_Pair(src, dst, cache_key=key))
        for i, item in enumerate(items):
            for k, candidate in enumerate(item.candidates):
                pairs.append(_Pair(item.input, candidate, item_index=i, candidate_index=k))

        # 3. Estimate flows, chunked per image size.
        pred_flows: list[list[torch.Tensor | None]] = [[None] * len(item.candidates) for item in items]
        for pair, flow in self._estimate(pairs):
            if pair.cache_key is not None:
                gt_flows[pair.cache_key] = flow
                self._cache_put(pair.cache_key, flow)
            else:
                pred_flows[pair.item_index][pair.candidate_index] = flow

        # 4. Pair each item's candidate flows with its (cached or fresh) target flow.
        out = []
        for item, preds in zip(items, pred_flows, strict=True):
            v_pred = torch.stack(preds)  # (K, H, W, 2)
            v_back = gt_flows[_cache_key(item) + (BACKWARD,)].to(v_pred.device) if backward else None
            out.append((v_pred, gt_flows[_cache_key(item)].to(v_pred.device).expand_as(v_pred), v_back))
        return out

    def _estimate(self, pairs: list[_Pair]) -> list[tuple[_Pair, torch.Tensor]]:
        """Run the estimator over pairs grouped by size, <= max_batch pairs per call; flows are (H, W, 2)."""
        by_size: dict[tuple[int, int], list[_Pair]] = {}
        for pair in pairs:
            by_size.setdefault(tuple(pair.src.shape[-2:]), []).append(pair)
        done = []
        for group in by_size.values():
            for start in range(0, len(group), self.max_batch):
                chunk = group[start : start + self.max_batch]
                flows = self.estimator(torch.stack([p.src for p in chunk]), torch.stack([p.dst for p in chunk]))
                self.estimator_calls += 1
                self.pairs_estimated += len(chunk)
                done.extend(zip(chunk, flows, strict=True))
        return done

    def _cache_get(self, key: tuple) -> torch.Tensor | None:
        flow = self._cache.get(key)
        if flow is None:
            self.cache_misses += 1
            return None
        self.cache_hits += 1
        self._cache.move_to_end(key)  # most recently used
        return flow

    def _cache_put(self, key: tuple, flow: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = flow.to("cpu", copy=True)  # a copy: never pin the whole chunk's flow tensor
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # least recently used


def _cache_key(item: FlowItem) -> tuple[str, int, int]:
    """(prompt_id, H, W): the same prompt scored at another size needs its own target flow."""
    return (item.prompt_id, item.input.shape[-2], item.input.shape[-1])


def _check_item(item: FlowItem) -> torch.Tensor:
    """Validate one item; return its target at the input's size (uint8 (3, H, W))."""
    where = f"FlowItem(prompt_id={item.prompt_id!r})"
    for name, image, ndim in (("input", item.input, 3), ("target", item.target, 3), ("candidates", item.candidates, 4)):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
            raise ValueError(f"{where}.{name}: expected a uint8 tensor, got {getattr(image, 'dtype', type(image))}")
        if image.ndim != ndim or image.shape[-3] != 3 or min(image.shape) == 0:
            layout = "(K, 3, H, W)" if ndim == 4 else "(3, H, W)"
            raise ValueError(f"{where}.{name}: expected a non-empty {layout} tensor, got {tuple(image.shape)}")
    size = tuple(item.input.shape[-2:])
    if tuple(item.candidates.shape[-2:]) != size:
        raise ValueError(
            f"{where}: candidates are {tuple(item.candidates.shape[-2:])} but the input is {size}; "
            "candidates must have the input's size"
        )
    if tuple(item.target.shape[-2:]) == size:
        return item.target
    resized = F.interpolate(item.target[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def build_flow_scorer(cfg: FlowRewardConfig, *, device: str, cache_dir: str, preservation: dict | None = None,
                      heat: bool = False) -> FlowRewardScorer:  # fmt: skip
    """The run's flow reward: the `reward.flow.estimator` on `device` (RAFT weights cached in `cache_dir`)."""
    return FlowRewardScorer(build_flow_estimator(cfg, device=device, cache_dir=cache_dir), cfg,
                            preservation=preservation, heat=heat)  # fmt: skip
