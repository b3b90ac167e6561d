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
queueing, not an impossible request.

Autoscaling clusters (see :func:`autoscaler` for the detection; a local ``ray.init``
has none): a request beyond what the autoscaler's node types can ever reach, where
they are known, fails at once; otherwise the request is handed to the autoscaler
(``ray.autoscaler.sdk.request_resources``) and the check waits up to
``ray.resource_wait_s``, logging what it waits for every 10 s, then fails.
``IMGPIPE_AUTOSCALING=1``/``0`` overrides the detection.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import Config
from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

PREFETCH_BATCHES = 4  # augmented/decoded batches each consumer may hold in the object store
LOG_EVERY_S = 10.0  # progress lines while waiting for the autoscaler


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
        """One resource bundle per consumer (for the autoscaler)."""
        out = []
        for p in self.parts:
            b = {"CPU": p.cpu, **({"GPU": p.gpu} if p.gpu else {})}
            out += [b] * p.count
        return out


def _store_note(key: str, batch: int, size: int, consumers: int) -> tuple[int, str]:
    nbytes = PREFETCH_BATCHES * batch * 3 * size * size * consumers
    return nbytes, (f"object store ~{_gb(nbytes)}: {PREFETCH_BATCHES} batches x {key}={batch} x 3 x "
                    f"{size}x{size} px x {consumers} consumers")


def train_request(cfg: Config, cluster_cpus: float) -> Request:
    """What ``train.run`` asks for, sized by :func:`pipeline.ops.runtime.train_resources`."""
    from pipeline.ops.runtime import (
        AUGMENT_ACTOR_CPUS,
        EVAL_TASK_CPUS,
        READ_TASK_CPUS,
        train_resources,
    )

    t, a = cfg.train, cfg.augment
    res = train_resources(cfg, cluster_cpus)
    per_key = (f"train.cpus_per_worker={t.cpus_per_worker:g}" if t.cpus_per_worker is not None
               else f"{res.cpus_per_worker:g} CPU (auto)")
    parts = [
        Part(t.num_workers, "training worker", res.cpus_per_worker, res.gpus_per_worker,
             cpu_key=f"train.num_workers={t.num_workers} x {per_key}",
             gpu_key="train.use_gpu=true"),
        Part(2, "read task", READ_TASK_CPUS, cpu_key=f"2 read tasks x {READ_TASK_CPUS:g} CPU"),
        Part(1, "eval task", EVAL_TASK_CPUS, cpu_key=f"1 eval task x {EVAL_TASK_CPUS:g} CPU"),
    ]
    if a.device == "cpu":  # otherwise the training workers decode and augment themselves
        parts.insert(1, Part(a.actors, "augment actor", AUGMENT_ACTOR_CPUS,
                             cpu_key=f"augment.actors={a.actors} x {AUGMENT_ACTOR_CPUS:g} CPU"))
    nbytes, note = _store_note("augment.batch_size", a.batch_size, cfg.data.image_size,
                               a.actors + t.num_workers)
    return Request(parts, nbytes, f"augment.batch_size={a.batch_size} at data.image_size="
                                  f"{cfg.data.image_size}", [note])


def predict_request(cfg: Config, cluster_cpus: float, image_size: int | None = None) -> Request:
    """What ``predict.run`` asks for, sized by :func:`pipeline.ops.runtime.predict_resources`.

    ``image_size``: the model's input size (its meta); default ``data.image_size``."""
    from pipeline.ops.runtime import READ_TASK_CPUS, predict_resources

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
    from pipeline.ops.runtime import READ_TASK_CPUS

    cpus = max(READ_TASK_CPUS, 0.5)
    return Request([Part(1, "pack task", cpus, cpu_key=f"1 pack task x {cpus:g} CPU")])


# ------------------------------------------------------------------ cluster capacity


@dataclass
class Capacity:
    totals: dict[str, float]  # resource -> amount
    nodes: list[dict[str, float]]  # resource shapes a single worker/actor can land on
    phrase: Callable[[str, float], str]  # how to say what is there: "the cluster has 0"


@dataclass
class Autoscaler:
    limits: dict[str, float]  # the most each resource can reach at full scale (inf: unknown)
    shapes: list[dict[str, float]]  # node types it can launch
    described: str  # "gpu-worker (4 CPU, 1 GPU) x 0-10; ..." or "" when unknown


def _current() -> Capacity:
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    totals = {k: float(v) for k, v in ray.cluster_resources().items()}
    return Capacity(totals, nodes, lambda unit, v: f"the cluster has {_amount(unit, v)}")


def autoscaler() -> Autoscaler | None:
    """The cluster's autoscaler, or None on a fixed cluster (a local ``ray.init`` has none).

    Detected from (1) the cluster config an autoscaler publishes in the GCS (scalable
    node groups, with their shapes and limits: autoscaler v2, KubeRay v2, Anyscale), or
    (2) named node types in the autoscaler's status, as ``ray status`` shows them
    (cluster launcher and KubeRay with autoscaler v1 or v2; a cluster without one
    reports only anonymous ``node_<id>`` types; limits unknown). ``IMGPIPE_AUTOSCALING``
    ``=1``/``=0`` overrides the detection."""
    env = os.environ.get("IMGPIPE_AUTOSCALING", "").strip()
    if env == "0":
        return None
    found = _from_cluster_config()
    if found is None:
        types = _named_node_types()
        if types:
            found = Autoscaler({}, [], "node types " + ", ".join(types) + "; sizes unknown")
    if found is None and env == "1":
        found = Autoscaler({}, [], "")
    return found


def _from_cluster_config() -> Autoscaler | None:
    try:
        import ray._private.state as state

        conf = state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - an older/odd GCS: the other probes decide
        log.debug("preflight: no autoscaler cluster config: %s", e)
        return None
    groups = [g for g in (conf.node_group_configs if conf else []) if g.resources and g.max_count != 0]
    if not any(g.max_count == -1 or g.max_count > g.min_count for g in groups):
        return None
    limits: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for g in groups:
        for k, v in g.resources.items():
            limits[k] = limits.get(k, 0.0) + (math.inf if g.max_count == -1 else g.max_count * float(v))
    for k, v in conf.max_resources.items():
        limits[k] = min(limits.get(k, math.inf), float(v))
    shapes = [{k: float(v) for k, v in g.resources.items()} for g in groups]
    return Autoscaler(limits, shapes, "; ".join(_describe_group(g) for g in groups))


_ANONYMOUS_TYPE = re.compile(r"node_[0-9a-f]+")  # the read-only provider's type per node


def _named_node_types() -> list[str]:
    return sorted(n for n in _autoscaler_status()[0] if n and not _ANONYMOUS_TYPE.fullmatch(n))


def _autoscaler_status() -> tuple[set[str], dict[str, int]]:
    """(node type names, {type: nodes being launched}) from the autoscaler's status:
    v1 in the GCS KV, v2 through the GCS cluster status. Best effort."""
    names: set[str] = set()
    launching: dict[str, int] = {}
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        for key in ("active_nodes", "idle_nodes"):
            names.update(report.get(key) or {})
        for name, n in (report.get("pending_launches") or {}).items():
            names.add(name)
            launching[name] = launching.get(name, 0) + int(n)
        for node in report.get("pending_nodes") or []:  # [ip, type, status]
            launching[node[1]] = launching.get(node[1], 0) + 1
    except Exception as e:  # noqa: BLE001
        log.debug("preflight: no v1 autoscaler status: %s", e)
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        names.update(n.ray_node_type_name for n in status.active_nodes + status.idle_nodes)
        for req in status.pending_launches:
            names.add(req.ray_node_type_name)
            launching[req.ray_node_type_name] = launching.get(req.ray_node_type_name, 0) + req.count
        for node in status.pending_nodes:
            launching[node.ray_node_type_name] = launching.get(node.ray_node_type_name, 0) + 1
    except Exception as e:  # noqa: BLE001
        log.debug("preflight: no v2 cluster status: %s", e)
    return names, launching


def _describe_group(g) -> str:
    shape = ", ".join(_amount(k, float(g.resources[k])) for k in ("CPU", "GPU") if k in g.resources)
    most = "unlimited" if g.max_count == -1 else g.max_count
    return f"{g.name or 'node'} ({shape}) x {g.min_count}-{most}"


def _full_scale(now: Capacity, auto: Autoscaler) -> Capacity:
    totals = {k: max(now.totals.get(k, 0.0), auto.limits.get(k, math.inf))
              for k in set(now.totals) | {"CPU", "GPU", "object_store_memory"}}
    nodes = now.nodes + auto.shapes if auto.shapes else now.nodes + [{"CPU": math.inf, "GPU": math.inf}]
    where = f" (node types: {auto.described})" if auto.described else ""
    return Capacity(totals, nodes,
                    lambda unit, v: f"the autoscaler can reach at most {_amount(unit, v)}{where}")


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
    now = _current()
    found = problems(request, now)
    log.info("%s asks for %s CPU, %s GPU: %s", what, f"{request.cpu:g}", f"{request.gpu:g}",
             "; ".join(request.lines))
    if not found:
        return
    auto = autoscaler()
    if auto is None:
        raise UserError(found[0])
    never = problems(request, _full_scale(now, auto))
    if never:
        raise UserError(never[0])
    _wait(request, what, cfg.ray.resource_wait_s, found)


def _request_resources(bundles: list[dict[str, float]]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # noqa: BLE001 - asking is best effort; the wait still bounds it
        log.debug("preflight: request_resources failed: %s", e)


def _wait(request: Request, what: str, wait_s: float, found: list[str],
          clock: Callable[[], float] = time.monotonic) -> None:
    _request_resources(request.bundles())
    start = clock()
    last_log = -math.inf
    try:
        while True:
            left = wait_s - (clock() - start)
            if clock() - last_log >= LOG_EVERY_S:
                launching = _autoscaler_status()[1]
                doing = (", ".join(f"{n} x {t}" for t, n in sorted(launching.items()))
                         if launching else "no nodes yet")
                log.warning("%s: waiting for the autoscaler (%.0fs left of ray.resource_wait_s=%g; "
                            "launching: %s): %s", what, max(0.0, left), wait_s, doing, "; ".join(found))
                last_log = clock()
            if left <= 0:
                raise UserError(f"{found[0]} after waiting {wait_s:g}s for the autoscaler "
                                f"(ray.resource_wait_s)")
            time.sleep(min(1.0, left))
            found = problems(request, _current())
            if not found:
                log.warning("%s: the cluster has grown enough after %.0fs", what, clock() - start)
                return
    finally:
        _request_resources([])  # the run's own tasks and actors keep the demand from here on

