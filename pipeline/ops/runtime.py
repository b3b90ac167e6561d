"""Ray runtime: starting or joining Ray, keeping its chatter down, sizing resources.

Owns the one call to ``ray.init`` (local instance by default, ``ray.address`` or
``RAY_ADDRESS`` to join a cluster: :func:`cluster_address`) and the CPU arithmetic that
keeps Ray Data from starving when Ray Train workers hold CPUs on a small machine:
training workers take what is left after a reserve for data tasks, as fractional
logical CPUs. :mod:`pipeline.ops.preflight` builds on this arithmetic; nothing here
depends on it.

Secrets stay in this process: no credential is put in a Ray ``runtime_env``
(:func:`forwarded_env` names what is), and the ``imgpipe`` logger redacts URI passwords
(:class:`RedactSecrets`).
"""

from __future__ import annotations

import logging
import math
import os
import urllib.parse
from dataclasses import dataclass

import ray

from pipeline import storage
from pipeline.config import Config

log = logging.getLogger("imgpipe")


QUIET_BACKEND_LOG_LEVEL = "fatal"  # Ray's C++ log level on a normal (not --verbose) run
TRAIN_POLL_INTERVAL_S = 0.2  # s between Ray Train's polls of its workers (Ray's default: 2)


def cluster_address(cfg: Config) -> str | None:
    """The cluster this process joins (``ray.address``, else ``$RAY_ADDRESS``); None: it
    starts a local instance of its own."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


# What a cluster's workers get from this process's environment: non-secret S3 settings
# only, for workers whose node lacks them. Credentials never travel (Ray writes a
# runtime_env in plain text to its logs and job tables): a cluster's workers use their
# node's own credential chain (instance profile, IRSA, environment set on the cluster).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set here, an endpoint without its ``user:pass@``
    (s3fs refuses userinfo in an endpoint anyway: it signs requests with the key pair)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if "AWS_ENDPOINT_URL" in env:
        parts = urllib.parse.urlsplit(env["AWS_ENDPOINT_URL"])
        env["AWS_ENDPOINT_URL"] = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return env


class RedactSecrets(logging.Filter):
    """On the ``imgpipe`` logger: a URI's ``user:password@`` never reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: leave it to the handler's error path
            return True
        record.msg, record.args = storage.redact(message), None
        return True


if not any(isinstance(f, RedactSecrets) for f in log.filters):
    log.addFilter(RedactSecrets())


def ensure_ray(cfg: Config, quiet: bool = False) -> None:
    """Start a local Ray instance, or join ``cfg.ray.address`` / ``$RAY_ADDRESS``."""
    # Ray Train's controller takes each ray.train.report from a one-slot queue when it
    # polls the workers (every 2 s by default): an epoch shorter than that waited for the
    # poll in its report (demo epochs 8-20: 1.2 s of each ~2.0 s). Ray Train hands this
    # variable from the driver (read when a run starts) to its controller, also on a cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_INTERVAL_S))
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Keep the driver's console for our progress; Ray's INFO chatter only with --verbose.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1" if quiet else "0")
    if not cfg.ray.verbose:
        # Ray's C++ core writes its ERROR lines ("E ... core_worker.cc:...") to the driver's
        # stderr; they are Ray's internal notes, never imgpipe's errors (a failure reaches
        # us as an exception). Set before ray.init: read when the core worker starts; a
        # local instance's raylet and workers inherit it, so their log files keep only
        # FATAL lines. --verbose (ray.verbose) or an explicit RAY_BACKEND_LOG_LEVEL keep them.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", QUIET_BACKEND_LOG_LEVEL)
    level = logging.INFO if cfg.ray.verbose else logging.ERROR
    address = cluster_address(cfg)
    # Worker and actor output (Ray Train's banners, Ray Data's per-rank logs) only with
    # --verbose: imgpipe prints its own progress on the driver.
    kwargs = dict(logging_level=level, log_to_driver=cfg.ray.verbose, configure_logging=True)
    if address:
        env = forwarded_env()
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
    else:
        # A local instance's raylet and workers inherit this process's environment: nothing
        # to forward. No dashboard: it costs seconds of CPU at start on a 2-core machine;
        # stall dumps then find workers in the process table (watchdog.child_workers).
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    _quiet_ray_data(quiet, cfg.ray.verbose)
    log.info("ray: %s", describe_cluster())


def _quiet_ray_data(quiet: bool, verbose: bool) -> None:
    import ray.data  # deferred: ~2 s to import; modules that only size resources need none of it

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = verbose
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = verbose
    if not verbose:
        for name in ("ray.data", "ray.train", "ray.tune", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)


def describe_cluster() -> str:
    """``"2 node(s), 8 CPU, 1 GPU"``: what the cluster has now (Ray must be initialised)."""
    res = ray.cluster_resources()
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{alive} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


# Logical CPUs of Ray Data work. Reads are I/O bound: a quarter CPU lets one run beside
# a full actor on a 2-CPU machine (a 1-CPU read task next to a 1-CPU actor would wait
# forever for the CPU a training worker holds).
READ_TASK_CPUS = 0.2
EVAL_TASK_CPUS = 0.1  # decode + resize of validation images (each rank reads all of val)
AUGMENT_ACTOR_CPUS = 1.0


@dataclass(frozen=True)
class TrainResources:
    """How :func:`train_resources` splits the cluster."""

    cpus_per_worker: float  # logical CPUs each Ray Train worker holds
    data_cpus: float  # logical CPUs left for Ray Data (decode + augment actors, reads)
    gpus_per_worker: float


def train_resources(cfg: Config, cluster_cpus: float) -> TrainResources:
    """Split the cluster's CPUs between training workers and Ray Data.

    Ray Data needs at least one CPU per augment actor plus a read task; training
    workers get the rest, fractionally (a worker's threads are capped by
    ``train.torch_threads``, so a fraction of a logical CPU is an accounting share,
    not a limit on speed). An explicit ``train.cpus_per_worker`` wins.
    """
    n = cfg.train.num_workers
    # the train pipeline (reads + actors) and one validation pipeline (read + eval task)
    actors = cfg.augment.actors if cfg.augment.device == "cpu" else 0  # else workers augment
    data_reserve = actors * AUGMENT_ACTOR_CPUS + 2 * READ_TASK_CPUS + EVAL_TASK_CPUS
    if cfg.train.cpus_per_worker is not None:
        per = cfg.train.cpus_per_worker
    else:
        # floor to 0.01: rounding up by a hair is enough to starve Ray Data for good
        per = max(0.01, min(1.0, math.floor((cluster_cpus - data_reserve) / n * 100) / 100))
    return TrainResources(per, max(0.0, cluster_cpus - per * n), 1.0 if cfg.train.use_gpu else 0.0)


def training_threads(configured: int, local_workers: int) -> int:
    """Intra-op threads of a CPU training worker: ``configured`` (``train.torch_threads``)
    or, when 0, this node's logical CPUs over the training workers on it (Ray Data's
    actors mostly wait while the model steps: a worker held to one thread next to idle
    cores trained at 0.67x a plain loop, steady, at 1 worker on 2 cores, 1.01x with 2)."""
    if configured > 0:
        return configured
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node), 1.0)
    return max(1, int(cpus // max(1, local_workers)))


@dataclass(frozen=True)
class AugmentPool:
    """One training rank's share of Ray Data (see :func:`augment_pool`)."""

    actors: int  # decode + augment actors of this rank's stream (0: the worker augments)
    cpus_per_actor: float  # logical CPUs each
    cpu_limit: float  # logical CPUs this rank's stream may use at once (actors + reads)


def augment_pool(cfg: Config, world: int, cluster_cpus: float) -> AugmentPool:
    """Each rank's training stream gets an equal share of what :func:`train_resources`
    left for Ray Data: ``augment.actors`` (in all) split over the ranks, at least one
    each, sized so that every rank's actors and a read task fit at the same time."""
    share = train_resources(cfg, cluster_cpus).data_cpus / world
    if cfg.augment.device != "cpu":
        return AugmentPool(0, 0.0, share)
    actors = max(1, math.ceil(cfg.augment.actors / world))
    per = max(0.01, math.floor(min(AUGMENT_ACTOR_CPUS, (share - 2 * READ_TASK_CPUS) / actors) * 100) / 100)
    return AugmentPool(actors, per, share)


@dataclass(frozen=True)
class PredictResources:
    """How :func:`predict_resources` sizes the inference actor pools."""

    decode_cpus: float  # logical CPUs per decode actor
    model_cpus: float  # logical CPUs per model actor
    model_threads: int  # torch intra-op threads in a CPU model actor


def predict_resources(cfg: Config, cluster_cpus: float) -> PredictResources:
    """Size the inference actor pools so two read tasks always find a slot (predict's
    writer asks for no CPU).

    A CPU model actor takes half the cluster (at most 4 CPUs: more threads stop
    paying for a small CNN); decode actors share what is left after the read tasks'
    reserve.
    """
    p = cfg.predict
    reserve = 2 * READ_TASK_CPUS
    if p.num_gpus > 0:
        model_cpus = 1.0
    else:
        model_cpus = max(0.5, min(4.0, math.floor(cluster_cpus / 2 / p.model_actors * 100) / 100))
    left = cluster_cpus - reserve - model_cpus * p.model_actors
    decode = max(0.1, min(1.0, math.floor(left / p.decode_actors * 100) / 100))
    return PredictResources(decode, model_cpus, max(1, int(model_cpus)))
