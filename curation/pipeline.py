"""The curation run on Ray Data: list the videos, skip those a previous run committed, then

    from_items(videos) -> flat_map(cut_video)        decode, shots, clips, frames, hashes: CPU tasks (at most
                                                     cluster.decode_workers at once)
                       -> map_batches(FlowStage)     flow, camera vs object motion, stages a, b: flow.workers actors
                                                     of flow.gpus GPUs each (ActorPoolStrategy, Ray Data's
                                                     `compute=` for what older releases called `concurrency=`)
                       -> map_batches(JudgeStage)    the MLLM check, instruction, category, stage c: judge.workers
                                                     actors
                       -> iter_rows -> Committer           one atomic commit per video (stage d)

and finalize the outputs (curation/output.py). The judge replicas the run starts are the trainer's
(rewards/judge_server.py). The cluster is `cluster.address` / RAY_ADDRESS (`ray job submit`), else an embedded
one-machine cluster.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import ray

from curation.config import ConfigError, CurateConfig
from curation.output import Committer, committed_keys, finalize, table
from curation.stage_cut import cut_video
from curation.stage_flow import FlowStage
from curation.stage_judge import JudgeStage
from curation.video import list_videos, video_key
from learner.driver.ray_session import join_or_start
from motionnft_core.models.tiny_judge import judge_source
from motionnft_core.secret import Secret, secret_from_env
from rewards.judge_server import JudgeServerActor


def init_ray(cfg: CurateConfig) -> bool:
    """Join `cluster.address` / RAY_ADDRESS, or start an embedded cluster; True when this run started one (and so
    shuts it down). A cluster a caller had already initialised (a test's shared one) is used and left running."""
    return not ray.is_initialized() and join_or_start(cfg.cluster.address, cfg.cluster.num_cpus)


def check_cpus(cfg: CurateConfig, cpus: float) -> None:
    """The decoding tasks and the stages' actors must fit the embedded cluster at once: with more asked for than it
    holds, Ray Data's actor pools wait behind the tasks and the run stalls."""
    c = cfg.cluster
    asked = (c.decode_workers * c.decode_cpus + cfg.flow.workers * cfg.flow.cpus
             + cfg.judge.workers * min(cfg.judge.cpus, 1.0))  # fmt: skip
    if not cfg.judge.scripted and not cfg.judge.url:
        asked += cfg.judge.replicas * cfg.judge.cpus
    if asked > cpus + 1e-9:
        raise ConfigError(f"cluster.decode_workers: the pipeline asks for {asked:g} CPUs at once (decoding "
                          "tasks, flow and judge actors, judge replicas) but the embedded cluster has "
                          f"{cpus:g} (cluster.num_cpus): fewer workers or fewer CPUs each")  # fmt: skip


def start_judges(cfg: CurateConfig, local: bool) -> tuple[list[Any], list[str], Secret | None]:
    """(replica actors, their URLs, API key): none started for an external `judge.url` or a scripted judge."""
    j = cfg.judge
    if j.scripted:
        return [], [], None
    if j.url:
        return [], [j.url], secret_from_env(j.api_key_env)
    key = secret_from_env(j.api_key_env, generate=True)
    client = j.client_config()
    model = functools.partial(judge_source, client, cfg.input.cache_dir)
    actors = [
        JudgeServerActor.options(num_cpus=j.cpus, num_gpus=j.gpus)
        .remote(model, client, api_key=key, host="127.0.0.1" if local else None)
        for _ in range(j.replicas)
    ]
    return actors, [ray.get(a.url.remote(), timeout=j.startup_timeout_s + 120) for a in actors], key


def build_dataset(cfg: CurateConfig, videos: list[dict[str, str]], urls: list[str], key: Secret | None,
                  judge: bool = True):  # fmt: skip
    """The Ray Data pipeline of the module docstring over `videos` ({video, video_key} items); without `judge`,
    stages a and b only (bench/curation.py)."""
    ds = ray.data.from_items(videos, override_num_blocks=max(1, len(videos)))
    ds = ds.flat_map(cut_video, fn_kwargs={"cfg": cfg}, num_cpus=cfg.cluster.decode_cpus,
                     compute=ray.data.TaskPoolStrategy(size=cfg.cluster.decode_workers))  # fmt: skip
    ds = ds.map_batches(FlowStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.flow.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.flow.workers),
                        num_gpus=cfg.flow.gpus, num_cpus=cfg.flow.cpus)  # fmt: skip
    if not judge:
        return ds
    return ds.map_batches(JudgeStage, fn_constructor_kwargs={"cfg": cfg, "urls": urls, "api_key": key},
                          batch_size=cfg.judge.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=cfg.judge.workers),
                          num_cpus=min(cfg.judge.cpus, 1.0))  # fmt: skip


def run_curation(cfg: CurateConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A whole run (or the rest of an interrupted one); returns the summary of curation/output.py."""
    started = time.time()
    items = [{"video": v, "video_key": video_key(v, cfg.input.videos)} for v in list_videos(cfg.input)]
    done = committed_keys(cfg.output.dir)
    todo = [item for item in items if item["video_key"] not in done]
    log(f"[curate] {len(items)} videos under {cfg.input.videos}: {len(items) - len(todo)} already committed, "
        f"{len(todo)} to curate into {cfg.output.dir}")  # fmt: skip
    if todo:
        local = init_ray(cfg)
        judges: list[Any] = []
        try:
            if local:
                check_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
            judges, urls, key = start_judges(cfg, local)
            committer = Committer(cfg, len(items), already=len(items) - len(todo), log=log)
            for row in build_dataset(cfg, todo, urls, key).iter_rows():
                committer.add(row)
            if committer.pending:
                raise RuntimeError(f"videos left incomplete by the pipeline: {sorted(committer.pending)}")
        finally:
            for actor in judges:
                try:
                    ray.get(actor.stop.remote(), timeout=60)
                except Exception as err:  # noqa: BLE001 - the replica's process group dies with it anyway
                    log(f"[curate] stopping a judge replica: {err}")
            if local:
                ray.shutdown()
    summary = finalize(cfg, started)
    log(table(summary))
    log(f"[curate] dataset: {cfg.output.dir}/dataset (train with data.source=<that> data.split_column=split)")
    return summary
