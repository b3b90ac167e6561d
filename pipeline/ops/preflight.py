"""Pre-flight check: will the cluster ever run what this command is about to ask for?

Before train, predict or pack starts any Ray work, the resources it will request
(training workers x CPU/GPU, actor pools, Ray Data tasks, object store for the
planned batches) are compared with what the cluster has. Ray itself would queue an
impossible request forever ("Cluster resources are not enough to run any task");
here it fails at once with a :class:`UserError` (exit 2) naming the config keys and
the numbers, e.g. ``train.use_gpu=true needs 2 GPUs (2 training workers x 1 GPU);
the cluster has 0``.

Checked: total GPUs, total CPUs, that every single worker/actor fits on one node,
and the object store. Totals, not what is free now: busy resources are Ray's normal
queueing, not an impossible request. The sizes come from
:mod:`pipeline.ops.runtime`'s resource arithmetic, which the run itself uses.

Autoscaling clusters (see :func:`autoscaler`): a request beyond the autoscaler's known
limits fails at once; otherwise the check asks the autoscaler for the request's
bundles (``ray.autoscaler.sdk.request_resources``), holds a placement group of them,
and waits up to ``ray.resource_wait_s`` for it to be placed, logging what it waits for
every 10 s, then fails. Only public Ray APIs are used.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.placement_group import placement_group, remove_placement_group

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.ops.runtime import (
    READ_TASK_CPUS,
    augment_pool,
    cluster_address,
    describe_cluster,
    predict_resources,
    train_resources,
)

log = logging.getLogger("imgpipe")

PREFETCH_BATCHES = 4  # augmented/decoded batches each consumer may hold in the object store
LOG_EVERY_S = 10.0  # progress lines while waiting for the autoscaler
POLL_S = 1.0  # how often the wait looks at the cluster again


@dataclass(frozen=True)
class Part:
    """``count`` identical consumers (workers, actors, tasks), each held on one node."""

    count: int
    label: str  # "training worker", "augment actor", "read task"...
    cpu: float  # each
    gpu: float = 0.0  # each
    cpu_key: str = ""  # the config keys behind the CPUs, e.g. "train.num_workers=2 x train.cpus_per_worker=1"
    gpu_key: str = ""  # the config keys behind the GPUs, e.g. "train.use_gpu=true"

    def line(self) -> str:
        s = "" if self.count == 1 else "s"
        each = f"{self.cpu:g} CPU" + (f" + {self.gpu:g} GPU" if self.gpu else "")
        return f"{self.count} {self.label}{s} x {each}"


@dataclass
class Request:
    """What one command will ask Ray for."""

    parts: list[Part]
    object_store_bytes: int = 0
    store_key: str = ""  # the config keys behind the object store estimate
    notes: list[str] = field(default_factory=list)  # extra human lines (object store arithmetic)

    @property
    def cpu(self) -> float:
        return round(sum(p.count * p.cpu for p in self.parts), 4)

    @property
    def gpu(self) -> float:
        return round(sum(p.count * p.gpu for p in self.parts), 4)

    @property
    def lines(self) -> list[str]:
        """One human line per part, then the object store estimate."""
        return [p.line() for p in self.parts] + self.notes

    def bundles(self) -> list[dict[str, float]]:
        """One resource bundle per consumer (for the autoscaler and the placement group;
        a consumer that asks for nothing has none)."""
        out = []
        for p in self.parts:
            b = {k: v for k, v in (("CPU", p.cpu), ("GPU", p.gpu)) if v}
            out += [b] * p.count if b else []
        return out


def _store_note(key: str, batch: int, size: int, consumers: int) -> tuple[int, str]:
    nbytes = PREFETCH_BATCHES * batch * 3 * size * size * consumers
    return nbytes, (f"object store ~{_gb(nbytes)}: {PREFETCH_BATCHES} batches x {key}={batch} x 3 x "
                    f"{size}x{size} px x {consumers} consumers")


def train_request(cfg: Config, cluster_cpus: float) -> Request:
    """What ``train.run`` asks for, sized by :func:`pipeline.ops.runtime.train_resources`."""
    t, a = cfg.train, cfg.augment
    res = train_resources(cfg, cluster_cpus)
    per_key = (f"train.cpus_per_worker={t.cpus_per_worker:g}" if t.cpus_per_worker is not None
               else f"{res.cpus_per_worker:g} CPU (auto)")
    parts = [
        Part(t.num_workers, "training worker", res.cpus_per_worker, res.gpus_per_worker,
             cpu_key=f"train.num_workers={t.num_workers} x {per_key}",
             gpu_key="train.use_gpu=true"),
    ]
    # each rank's own stream: its augment actors and its reader actor, within its share
    # of what the workers leave (at least one augment actor and the reader must fit)
    pool = augment_pool(cfg, t.num_workers, cluster_cpus)
    if pool.actors:
        parts.append(Part(t.num_workers * pool.actors, "augment actor", pool.cpus_per_actor,
                          cpu_key=f"augment.actors={a.actors} over {t.num_workers} ranks, "
                                  f"{pool.cpus_per_actor:g} CPU each"))
    reads = max(READ_TASK_CPUS, pool.cpu_limit - pool.actors * pool.cpus_per_actor)
    parts.append(Part(t.num_workers, "read share", round(reads, 2),
                      cpu_key=f"a reader actor of {READ_TASK_CPUS:g} CPU per rank, in its stream's share"))
    nbytes, note = _store_note("augment.batch_size", a.batch_size, cfg.data.image_size,
                               t.num_workers * pool.actors + t.num_workers)
    return Request(parts, nbytes, f"augment.batch_size={a.batch_size} at data.image_size="
                                  f"{cfg.data.image_size}", [note])


def predict_request(cfg: Config, cluster_cpus: float, image_size: int | None = None) -> Request:
    """What ``predict.run`` asks for, sized by :func:`pipeline.ops.runtime.predict_resources`.

    ``image_size``: the model's input size (its meta); default ``data.image_size``."""
    p = cfg.predict
    res = predict_resources(cfg, cluster_cpus)
    size = image_size or cfg.data.image_size
    parts = [
        Part(p.decode_actors, "decode actor", res.decode_cpus,
             cpu_key=f"predict.decode_actors={p.decode_actors} x {res.decode_cpus:g} CPU"),
        Part(p.model_actors, "model actor", res.model_cpus, p.num_gpus,
             cpu_key=f"predict.model_actors={p.model_actors} x {res.model_cpus:g} CPU",
             gpu_key=f"predict.num_gpus={p.num_gpus:g} x predict.model_actors={p.model_actors}"),
        Part(2, "read/write task", READ_TASK_CPUS, cpu_key=f"2 read/write tasks x {READ_TASK_CPUS:g} CPU"),
    ]
    nbytes, note = _store_note("predict.batch_size", p.batch_size, size, p.decode_actors + p.model_actors)
    return Request(parts, nbytes, f"predict.batch_size={p.batch_size} at {size}x{size} px", [note])


def pack_request(cfg: Config) -> Request:
    """What ``packing.pack`` asks for: shard-writing tasks (they return only summaries)."""
    cpus = max(READ_TASK_CPUS, 0.5)
    return Request([Part(1, "pack task", cpus, cpu_key=f"1 pack task x {cpus:g} CPU")])


# ------------------------------------------------------------------ cluster capacity


@dataclass
class Capacity:
    """What a request is held against: the cluster now, or at full scale."""

    totals: dict[str, float]  # resource -> amount
    nodes: list[dict[str, float]]  # resource shapes a single worker/actor can land on
    phrase: Callable[[str, float], str]  # how to say what is there: "the cluster has 0"


def current_capacity() -> Capacity:
    """The cluster's totals and alive nodes now (``ray.cluster_resources``, ``ray.nodes``)."""
    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    totals = {k: float(v) for k, v in ray.cluster_resources().items()}
    return Capacity(totals, nodes, lambda unit, v: f"the cluster has {_amount(unit, v)}")


@dataclass
class Autoscaler:
    """What is known of a cluster's autoscaler."""

    limits: dict[str, float]  # the most each resource can reach at full scale (absent: unknown)
    shapes: list[dict[str, float]]  # node types it can launch (empty: unknown)
    described: str  # "gpu-worker (4 CPU, 1 GPU) x 0-10; ..." or "" when unknown

    def full_scale(self, now: Capacity) -> Capacity:
        """``now`` grown as far as the autoscaler can take it (unknown limits: unlimited)."""
        totals = {k: max(now.totals.get(k, 0.0), self.limits.get(k, math.inf))
                  for k in set(now.totals) | {"CPU", "GPU", "object_store_memory"}}
        nodes = now.nodes + (self.shapes or [{"CPU": math.inf, "GPU": math.inf}])
        where = f" (node types: {self.described})" if self.described else ""
        return Capacity(totals, nodes,
                        lambda unit, v: f"the autoscaler can reach at most {_amount(unit, v)}{where}")


def autoscaler(joined: bool = False) -> Autoscaler | None:
    """The cluster's autoscaler, or None when the cluster cannot grow.

    Ray has no public API that says whether a cluster autoscales or which node types
    it can launch, so: ``IMGPIPE_AUTOSCALING=1``/``=0`` decides when set; otherwise a
    cluster this process ``joined`` (``ray.address`` or ``$RAY_ADDRESS``) may autoscale,
    limits unknown (the placement group of the wait finds out whether it grows), and
    a local instance started by this process never does."""
    env = os.environ.get("IMGPIPE_AUTOSCALING", "").strip()
    if env == "0" or (env != "1" and not joined):
        return None
    return Autoscaler({}, [], "")


# ------------------------------------------------------------------------ checking


def _amount(unit: str, v: float) -> str:
    if unit == "object_store_memory":
        return _gb(v)
    if v == math.inf:
        return f"unlimited {unit}"
    return f"{v:g} {unit}{'' if v == 1 or unit not in ('CPU', 'GPU') else 's'}"


def _gb(nbytes: float) -> str:
    if nbytes == math.inf:
        return "unlimited object store"
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def problems(req: Request, cap: Capacity) -> list[str]:
    """Why ``req`` cannot run on ``cap``, most telling first; empty when it fits."""
    out = []
    have_gpu = cap.totals.get("GPU", 0.0)
    if req.gpu > have_gpu + 1e-9:
        gparts = [p for p in req.parts if p.gpu]
        each = "; ".join(f"{p.count} {p.label}{'' if p.count == 1 else 's'} x {p.gpu:g} GPU" for p in gparts)
        out.append(f"{' + '.join(p.gpu_key for p in gparts)} needs {_amount('GPU', req.gpu)} ({each}); "
                   f"{cap.phrase('GPU', have_gpu)}")
    have_cpu = cap.totals.get("CPU", 0.0)
    if req.cpu > have_cpu + 1e-9:
        out.append(f"{' + '.join(p.cpu_key for p in req.parts)} needs {_amount('CPU', req.cpu)}; "
                   f"{cap.phrase('CPU', have_cpu)}")
    for p in req.parts:
        shape = {"CPU": p.cpu, "GPU": p.gpu}
        if cap.nodes and not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in shape.items() if v) for n in cap.nodes):
            big = max(cap.nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)))
            keys = p.cpu_key + (f", {p.gpu_key}" if p.gpu else "")
            out.append(f"one {p.label} ({keys}) needs a node with {_amount('CPU', p.cpu)}"
                       + (f" and {_amount('GPU', p.gpu)}" if p.gpu else "")
                       + f"; the largest node has {_amount('CPU', big.get('CPU', 0.0))} and "
                         f"{_amount('GPU', big.get('GPU', 0.0))}")
    store = cap.totals.get("object_store_memory", math.inf)
    if req.object_store_bytes > store:
        out.append(f"{req.store_key} needs ~{_gb(req.object_store_bytes)} of object store for "
                   f"{PREFETCH_BATCHES} batches in flight per consumer; "
                   f"{cap.phrase('object_store_memory', store)} (lower the batch size)")
    return out


def check(request: Request, what: str, cfg: Config) -> None:
    """Fail fast (``UserError``) if the cluster cannot run ``request``; on an autoscaling
    cluster wait up to ``cfg.ray.resource_wait_s`` for it to grow. ``what`` names the
    command in log lines ("train", "predict", "pack"). Ray must be initialised."""
    now = current_capacity()
    found = problems(request, now)
    log.info("%s asks for %s CPU, %s GPU: %s", what, f"{request.cpu:g}", f"{request.gpu:g}",
             "; ".join(request.lines))
    if not found:
        return
    auto = autoscaler(joined=cluster_address(cfg) is not None)
    if auto is None:
        raise UserError(found[0])
    never = problems(request, auto.full_scale(now))
    if never:
        raise UserError(never[0])
    wait_to_fit(request, what, cfg.ray.resource_wait_s, found)


def wait_to_fit(request: Request, what: str, wait_s: float, found: list[str]) -> None:
    """Wait up to ``wait_s`` for the cluster to grow until ``request`` fits, or raise
    ``UserError`` naming the first of ``found`` (its problems now).

    The autoscaler is asked for the request's bundles at once (``request_resources``,
    past its usual upscaling speed), and a placement group of them stands as the demand
    it serves; the group is placed once every consumer fits. Both are withdrawn on the
    way out: the run's own tasks and actors keep the demand from then on."""
    bundles = request.bundles()
    request_resources(bundles=bundles)
    group = placement_group(bundles, strategy="PACK")  # soft: the bundles may span nodes
    placed = group.ready()
    start = time.monotonic()
    next_log = start
    try:
        while True:
            left = wait_s - (time.monotonic() - start)
            if time.monotonic() >= next_log:
                log.warning("%s: waiting for the autoscaler (%.0fs left of ray.resource_wait_s=%g; "
                            "cluster now: %s): %s", what, max(0.0, left), wait_s, describe_cluster(),
                            "; ".join(found))
                next_log = time.monotonic() + LOG_EVERY_S
            if left <= 0:
                raise UserError(f"{found[0]} after waiting {wait_s:g}s for the autoscaler "
                                f"(ray.resource_wait_s)")
            ready, _ = ray.wait([placed], timeout=min(POLL_S, left))
            found = problems(request, current_capacity())
            if not found:
                log.warning("%s: the cluster has grown enough after %.0fs", what, time.monotonic() - start)
                return
            if ready:  # CPUs and GPUs fit; the object store does not yet
                time.sleep(min(POLL_S, left))
    finally:
        remove_placement_group(group)
        request_resources(bundles=[])
