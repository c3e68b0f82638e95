"""The learner group on Ray: one `LearnerWorker` actor per torch.distributed rank, each a thin shell around the plain
`NFTTrainer` (learner/trainer/nft_trainer.py), and the `LearnerGroup` that places the ranks and fans every driver call
out to all of them (the single-controller pattern of verl's worker groups).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch.distributed.constants import default_pg_timeout

from learner.trainer.checkpoint import export_lora, export_transformer, load_rank, save_rank
from learner.trainer.memory import CudaMemory
from learner.trainer.nft_trainer import (
    EMA,
    OLD,
    NFTTrainer,
    TrainSample,
    merge_rank_metrics,
    rank_micro_batches,
    rank_share,
    train_sample,
)
from motionnft_core import telemetry
from motionnft_core.config import ClusterConfig, LearnerConfig, NFTConfig, RolloutConfig
from motionnft_core.errors import first_line, lost_worker
from motionnft_core.faults import fault_point
from motionnft_core.models.parity import ParityProbe
from motionnft_core.models.policy import EditPolicy
from motionnft_core.models.weights import WeightManifest, weight_kind
from motionnft_core.net import node_address, whereabouts
from motionnft_core.s3 import S3Retry


class LearnerWorker:
    """One rank. Wrap at the call site: `ray.remote(num_gpus=g)(LearnerWorker)`."""

    def __init__(
        self,
        rank: int,
        world: int,
        build_policy: Callable[[], EditPolicy],
        nft: NFTConfig,
        learner: LearnerConfig,
        mixed_precision: bool,
        parity: RolloutConfig | None = None,
    ):
        telemetry.bind("learner", f"rank{rank}")
        self.busy = telemetry.Busy()
        self.rank, self.world, self.build_policy = rank, world, build_policy
        self.nft, self.learner, self.mixed_precision, self.parity = nft, learner, mixed_precision, parity
        self.trainer: NFTTrainer | None = None
        self.probe: ParityProbe | None = None
        self.listener: socket.socket | None = None  # rank 0: the rendezvous socket (`address`)

    def where(self) -> str:
        return f"rank {self.rank}: {whereabouts()}"

    def address(self) -> tuple[str, int]:
        """Rank 0: the rendezvous address, on this node's address only (loopback on the embedded cluster), its
        socket bound now and kept until the store takes it over (no other process can take the port meanwhile)."""
        host = node_address()
        self.listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        return host, self.listener.getsockname()[1]

    def setup(self, master: tuple[str, int]) -> bool:
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world))  # fmt: skip
        backend = self.learner.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        policy = self.build_policy()  # before the rendezvous: a rank that cannot load keeps no one waiting
        if self.parity is not None:
            self.probe = ParityProbe.build(policy, self.parity)
        listen_fd = self.listener.fileno() if self.rank == 0 else None
        store = dist.TCPStore(*master, self.world, is_master=self.rank == 0, master_listen_fd=listen_fd,
                              timeout=default_pg_timeout)  # fmt: skip
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world)
        self.trainer = NFTTrainer(policy, self.nft, self.learner, mixed_precision=self.mixed_precision)
        return True

    def train_step(self, groups: list, r: list[list[float]], n_global: int, step: int,
                   heats: list | None = None) -> dict[str, float]:  # fmt: skip
        with self.busy.call():
            fault_point(f"learner.rank{self.rank}.train_step", step)
            if self.trainer.learner.micro_batch == 0:
                self._fit_micro_batch(groups, r, step, heats)
            out = self.trainer.train_step(self._my_samples(groups, r, heats=heats), n_global, step)
        for phase in ("forward", "backward", "train"):
            telemetry.seconds(phase, out[f"{phase}_s"])
        return out

    def _fit_micro_batch(self, groups: list, r: list[list[float]], step: int, heats: list | None) -> None:
        """`learner.micro_batch: 0`, first step: probe this GPU's memory on 2 of this rank's samples and keep the
        micro-batch that fits (the same on every rank) for the rest of the run."""
        per_rank = -(-sum(len(rs) for rs in r) // self.world)
        samples = self._my_samples(groups, r, micro_batch=2, heats=heats)
        chosen = self.trainer.fit_micro_batch(samples, per_rank, step, CudaMemory(torch.device("cuda")))
        if self.rank == 0:
            probe = self.trainer.memory_probe
            print(f"learner micro-batch {chosen} of {per_rank} samples per rank, from free memory (peaks "
                  f"{probe['peak_1'] / 2**30:.1f} / {probe['peak_2'] / 2**30:.1f} GiB at 1 / 2 samples)", flush=True)

    def _my_samples(self, groups: list, r: list[list[float]], micro_batch: int | None = None,
                    heats: list | None = None) -> list[TrainSample]:  # fmt: skip
        """Fetch only the groups this rank trains on (the first group too when this rank only pads), and their
        prompts' motion heat when the driver passed it (nft.motion_focal)."""
        micro_batch = micro_batch or self.trainer.learner.micro_batch
        flat = [(g, k) for g, rs in enumerate(r) for k in range(len(rs))]
        idx = [i for mb in rank_micro_batches(len(flat), self.world, self.rank, micro_batch) for i in mb]
        wanted = sorted({flat[i][0] for i in idx if i >= 0} or {0})
        fetched = dict(zip(wanted, ray.get([groups[g] for g in wanted]), strict=True))
        heat = dict.fromkeys(wanted) if heats is None else dict(zip(wanted, ray.get([heats[g] for g in wanted]),
                                                                      strict=True))  # fmt: skip
        samples = [train_sample(fetched[g], k, r[g][k], heat=heat[g]) if g in fetched else None for g, k in flat]
        return rank_share(samples, self.world, self.rank, micro_batch)

    def gather(self, which: str = OLD) -> dict[str, torch.Tensor] | None:
        return self.trainer.gather(which)

    def publishable(
        self, version: int, which: str = OLD
    ) -> tuple[bytes | None, dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """The sampling policy ("old"; or with `which` EMA the eval EMA, what a checkpoint exports, for the
        held-out evaluation during training) as rank 0 publishes it: (msgpack manifest, weights, its output on
        the parity probe or None), (None, None, None) elsewhere; collective, call with num_returns=3. The eval
        EMA (kept in float32) is cast to the policy's dtype, as loading an export into a rollout worker casts it;
        it has no probe output (the probe checks the sampling policy)."""
        with self.busy.call(), telemetry.timed("publish"):
            fault_point(f"learner.rank{self.rank}.publish", version)
            weights = self.trainer.gather(which)
            probe = None if self.probe is None or which != OLD else self.trainer.probe_output(self.probe)
        if weights is None:
            return None, None, None
        if which == EMA:
            dtypes = self.trainer.gather_dtypes()
            weights = {name: t.to(dtypes[name]) for name, t in weights.items()}
        telemetry.count(telemetry.WEIGHT_BYTES, sum(t.nbytes for t in weights.values()))
        return WeightManifest.of(weights, version=version, kind=weight_kind(self.nft)).pack(), weights, probe

    def save(self, target: str, export: bool, retry: S3Retry | None = None) -> list[str]:
        """Collective: this rank's shards (rank 0: also the eval-EMA export for diffusers) to `target`, a dir or
        an s3:// prefix, written from this node; returns the files written, relative to `target`."""
        with self.busy.call(), telemetry.timed("checkpoint"):
            ema = self.trainer.gather(EMA) if export else None  # collective; the full tensors land on rank 0
            write_export = None if ema is None else functools.partial(self._export, ema)
            return save_rank(self.trainer.state_dict(), target, self.rank, export=write_export, retry=retry)

    def _export(self, ema: dict[str, torch.Tensor], out: Path) -> None:
        n = self.nft
        if n.full_finetune:
            export_transformer(ema, dict(self.trainer.policy.transformer.config), out / "transformer")
        else:
            export_lora(ema, out / "lora", family=self.trainer.policy.family, rank=n.lora_rank, alpha=n.lora_alpha,
                        targets=self.trainer.policy.lora_target_modules(n.lora_targets))  # fmt: skip

    def load(self, source: str, retry: S3Retry | None = None) -> int:
        state = self.trainer.state_dict()
        load_rank(state, source, retry=retry)
        self.trainer.load_state_dict(state)
        return self.trainer.step


class LearnerGroup:
    """`cluster.learner_ranks` LearnerWorker ranks packed by a placement group (one bundle per rank, GPUs
    `cluster.learner_gpus`, CPUs `cluster.cpus_per_actor`, custom `cluster.learner_resources`); one driver
    call fans out to all.

    Ranks are created on bundle k for rank k (as verl's RayResourcePool), rank 0 publishes the rendezvous
    address, and every collective method is called on all ranks at once. With `start=False` the ranks are
    placed but load nothing until `start()`, so a caller can check where they landed (`node_ids`) first.
    """

    def __init__(
        self,
        build_policy: Callable[[], EditPolicy],
        nft: NFTConfig,
        learner: LearnerConfig,
        cluster: ClusterConfig,
        *,
        mixed_precision: bool = False,
        parity: RolloutConfig | None = None,
        start: bool = True,
    ) -> None:
        n, gpus, cpus = cluster.learner_ranks, cluster.learner_gpus, cluster.cpus_per_actor
        custom = dict(cluster.learner_resources)
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        ray.get(self.pg.ready())
        actor = ray.remote(LearnerWorker)
        self.workers = [
            actor.options(
                num_cpus=cpus,
                num_gpus=gpus,
                resources=custom,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
            ).remote(k, n, build_policy, nft, learner, mixed_precision, parity)
            for k in range(n)
        ]
        if start:
            self.start()

    @property
    def node_ids(self) -> list[str]:
        """The Ray node of each rank, in rank order (known once placed, before anything loads)."""
        bundles = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        return [bundles[k] for k in range(len(self.workers))]

    def start(self) -> None:
        """Every rank loads its policy, then they meet in the torch.distributed rendezvous."""
        master = ray.get(self.workers[0].address.remote())
        try:  # the first rank to fail fails the group now; the rest would wait in the rendezvous
            _all_ranks([w.setup.remote(master) for w in self.workers])
        except Exception:
            self.shutdown()
            raise
        print("learner ranks: " + "; ".join(ray.get([w.where.remote() for w in self.workers])), flush=True)

    def train_step(self, groups: list, r: list[list[float]], step: int, heats: list | None = None) -> dict[str, float]:
        """Train on `groups` (ObjectRefs of GroupSample, passed by reference) with optimality r; summed metrics.
        `heats`: ObjectRefs of each group's motion heat (nft.motion_focal), fetched by the ranks that train on it."""
        n_global = sum(len(x) for x in r)
        extra = () if heats is None else (heats,)
        return merge_rank_metrics(_all_ranks([w.train_step.remote(groups, r, n_global, step, *extra)
                                              for w in self.workers]))  # fmt: skip

    def gather(self, which: str = OLD):
        """ObjectRef of rank 0's full adapter (the other ranks join the collective and return None)."""
        refs = [w.gather.remote(which) for w in self.workers]
        _all_ranks(refs)  # surfaces a failed rank (and brings rank 0's weights here: for tests and tools)
        return refs[0]

    def publishable(self, version: int, which: str = OLD):
        """(manifest ref, weights ref, parity probe output ref) of rank 0's gathered old policy (or eval EMA:
        `LearnerWorker.publishable`); the weights stay in the object store."""
        refs = [w.publishable.options(num_returns=3).remote(version, which) for w in self.workers]
        _all_ranks([manifest for manifest, _, _ in refs])  # surfaces a failed rank; fetches only the manifests
        return refs[0]

    def save(self, target: str, *, export: bool, retry: S3Retry | None = None) -> list[str]:
        """Every rank writes (and for S3 uploads) its own part of a checkpoint; the files written, all ranks."""
        files = _all_ranks([w.save.remote(target, export, retry) for w in self.workers])
        return sorted(f for mine in files for f in mine)

    def load(self, source: str, *, retry: S3Retry | None = None) -> int:
        return _all_ranks([w.load.remote(source, retry) for w in self.workers])[0]

    def shutdown(self) -> None:
        """Kill the ranks and free their placement group; a second call does nothing."""
        if self.pg is None:
            return
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
        self.pg = None


class LearnerLost(RuntimeError):
    """A learner rank died (its process or its node), or lost its input with a node: the group cannot go on (the
    other ranks wait in a collective), the driver rebuilds it."""


def _all_ranks(refs: list, peer_grace_s: float = 15.0) -> list:
    """ray.get of one collective call on every rank, failing at the first rank that fails: the survivors would
    wait in the collective for the lost one until the backend's timeout. A rank whose collective broke (its
    peer's connection reset) often reports before Ray reports the dead peer: its error waits `peer_grace_s` for
    that news."""
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            ray.get(done)
    except ray.exceptions.RayError as e:
        if lost_worker(e):
            if isinstance(e, ray.exceptions.RayActorError):
                raise LearnerLost(_rank_gone(e)) from e
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
            raise LearnerLost(f"a learner rank lost its input ({type(cause).__name__}: a node holding groups of "
                              f"this step is gone): {first_line(cause)}") from e  # fmt: skip
        if not isinstance(e, ray.exceptions.RayTaskError):
            raise
        ray.wait(pending, num_returns=len(pending), timeout=peer_grace_s, fetch_local=False)
        for ref in pending:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as lost:
                raise LearnerLost(f"{_rank_gone(lost)}; another rank's collective broke with it") from e
            except Exception:  # noqa: BLE001 - still running, or failed otherwise: the first error stands
                pass
        raise
    return ray.get(refs)


def _rank_gone(error: ray.exceptions.RayActorError) -> str:
    return f"a learner rank is gone ({type(error).__name__}: {first_line(error)})"
