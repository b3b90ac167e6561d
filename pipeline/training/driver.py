"""``imgpipe train`` on the driver: :func:`run` checks the inputs, builds the Ray Data
streams, runs a Ray Train ``TorchTrainer`` (DDP workers running
:func:`pipeline.training.loop.train_loop`), follows its progress, then scores the best
checkpoint on the test split and writes the report.

Data: each worker builds its own training stream for the whole run
(:mod:`pipeline.training.inputs`: its equal share of every epoch, in an order fixed by
the config, decoded and augmented by its own actor pool or, with ``augment.device``
cuda/worker, in the worker). Val goes through the one eval transform
(:class:`pipeline.transforms.EvalTransform`), once, on the driver, when it is small.

Restarting workers after a failure, or rerunning with the same ``train.run_name``,
resumes from the run's latest checkpoint (see :mod:`pipeline.training.state`); a rerun
only on the dataset the run started on (``RUN/dataset.json``). Bad input is refused
before any worker starts where the driver can check it (``model.pretrained`` is loaded
and verified here), else it stops the run at once, without restarts, as a one-line
UserError naming the cause (:mod:`pipeline.training.failures`). The run's lease
(:mod:`pipeline.ops.lease`) keeps a second run with the same name out.
"""

from __future__ import annotations

import io
import logging
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import torch
from ray.exceptions import RayError
from ray.train.torch import TorchTrainer

from pipeline import config, names, registry, storage
from pipeline.config import AugmentConfig, Config
from pipeline.data import shardset, stream
from pipeline.errors import UserError
from pipeline.inference import evaluate
from pipeline.models import artifact, pretrained
from pipeline.models import zoo as models
from pipeline.ops import lease, preflight
from pipeline.ops.runtime import EVAL_TASK_CPUS, ensure_ray, train_resources
from pipeline.ops.watchdog import Watchdog
from pipeline.report import report
from pipeline.training import callbacks, failures
from pipeline.training.loop import train_loop
from pipeline.training.progress import MetricsFollower, read_history
from pipeline.training.state import CHECKPOINT_PREFIX, SCORE, CheckpointSaver, RunSpec
from pipeline.transforms import EvalTransform

log = logging.getLogger("imgpipe")

VAL_IN_MEMORY_BYTES = 256 * 2**20  # val sets up to this (as uint8) are transformed once and shared
# val sets up to this many input px are transformed here: no Ray Data read and eval task
# processes to start (seconds of CPU each on a small machine) for what takes a second
VAL_HERE_MAX_PIXELS = 4096 * 32 * 32
COLUMNS = ["image_id", "image", "label"]


def run_name(cfg: Config) -> str:
    """``train.run_name``, or a new name: the registry name, the start time (1 s
    resolution) and a random suffix, so two runs started in the same second never share
    a run."""
    return cfg.train.run_name or f"{cfg.registry.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _storage_root(cfg: Config) -> str:
    """``train.storage`` as a URI; a path naming an existing regular file is refused."""
    root = storage.normalize(cfg.train.storage)
    if storage.exists(root) and not storage.isdir(root):
        raise UserError(f"train.storage {cfg.train.storage} is a file; expected a folder "
                        "(or a path that does not exist yet)")
    return root


def pretrained_state(cfg: Config, num_classes: int) -> dict[str, torch.Tensor] | None:
    """``model.pretrained``, loaded and checked on the driver before any worker starts
    (the workers get it through the object store): a weights name, ``NAME@vN``, a
    checkpoint folder (sha256-verified) or a plain state dict at a URI. UserError (one
    line, naming the file and why) for anything that is not usable weights for
    ``model.arch``; a pickle that would run code is refused, never run."""
    spec = cfg.model.pretrained
    if not spec:
        return None
    if pretrained.is_weights_name(spec):
        state = pretrained.load_for(spec, cfg.model.arch)  # unknown name, wrong arch, no package/internet
    elif "@" in spec and "/" not in spec:
        state = artifact.load(registry.resolve(cfg.registry.uri, spec)).state_dict
    elif storage.exists(storage.join(spec, names.META)):
        state = artifact.load(spec).state_dict
    elif storage.exists(spec):
        state = pretrained.read_weights(spec) if spec.endswith(pretrained.SAFETENSORS_SUFFIX) else _plain_state_dict(spec)
    else:
        raise UserError(f"model.pretrained not found: {spec} (a state-dict URI, a checkpoint folder, or NAME@vN)")
    # shares no tensor with the model: UserError now, not in every worker
    models.load_pretrained(models.build_model(cfg.model.arch, num_classes, cfg.model.dropout), state, spec)
    return state


UNPICKLING_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _plain_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, read with ``weights_only=True``."""
    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: the file is refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((x for x in lines if not x.startswith(UNPICKLING_BOILERPLATE)), lines[0] if lines else "")
        raise UserError(f"model.pretrained {uri} refused: not a plain state dict of tensors "
                        f"(torch.load with weights_only=True: {type(e).__name__}: {reason})") from None
    if isinstance(obj, dict):
        key = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if key is None:
            return obj
        found = f"a {type(obj[key]).__name__} at key {key!r}"
    else:
        found = f"a {type(obj).__name__}"
    raise UserError(f"model.pretrained {uri} refused: expected a state dict (tensor name -> tensor), found {found}")


def _check_dataset(run_uri: str, name: str, manifest: shardset.Manifest) -> dict[str, str] | None:
    """A run resumes only on the dataset it started on (``RUN/dataset.json``, recorded at
    its first start; runs from before that record: their checkpoints' ``meta.json``).
    Returns the record to write when the run starts (None: already there); a run
    without checkpoints has nothing to resume, so it takes the new dataset."""
    checkpoints = sorted(n for n in storage.listdir(run_uri) if n.startswith(CHECKPOINT_PREFIX))
    try:
        recorded = storage.read_json(storage.join(run_uri, names.RUN_DATASET))
    except storage.NotFound:
        recorded = None
        if checkpoints:
            meta = artifact.read_meta(storage.join(run_uri, checkpoints[-1]))
            recorded = {"manifest": meta.get("data_manifest"), "sha256": meta.get("data_manifest_sha256")}
    if recorded and recorded.get("sha256") == manifest.sha256:
        return None
    if recorded and recorded.get("sha256") and checkpoints:
        raise UserError(
            f"training run {name} ({run_uri}) was trained on dataset {recorded.get('manifest')} "
            f"(manifest sha256 {recorded['sha256']}); data.manifest {manifest.root} has manifest sha256 "
            f"{manifest.sha256}: resuming would mix datasets. Train a new run (another train.run_name), "
            "or resume on the run's own dataset")
    return {"manifest": manifest.root, "sha256": manifest.sha256}


def _manifest(cfg: Config) -> shardset.Manifest:
    """The dataset to train on, checked before anything starts."""
    if not cfg.data.manifest:
        raise UserError("data.manifest is not set: pack a dataset (`imgpipe pack SRC DST`) and "
                        "pass --set data.manifest=DST")
    manifest = shardset.read_manifest(cfg.data.manifest)
    for split in ("train", "val"):
        if manifest.rows(split) == 0:
            raise UserError(f"dataset {manifest.root} has no '{split}' images")
    models.build_model(cfg.model.arch, len(manifest.classes))  # fail fast on a bad arch
    callbacks.load(cfg.train.callbacks)  # fail fast on a bad entry (workers build their own)
    return manifest


def _eval_batch(batch: dict[str, np.ndarray], cfg: AugmentConfig, size: int) -> dict[str, np.ndarray]:
    """Ray Data task: decode + the eval transform (stateless, so a task, not an actor)."""
    return {"image": EvalTransform(cfg, size)(batch["image"]), "label": batch["label"].astype(np.int64),
            "image_id": batch["image_id"]}


def _val(cfg: Config, manifest: shardset.Manifest) -> tuple[dict[str, Any], Any]:
    """The val set in the object store, transformed once (a bad shard fails here): in
    this process when small, else by Ray Data tasks; or, when it is too large to hold,
    Ray Train's "val" dataset every rank reads."""
    size, rows = cfg.data.image_size, manifest.rows("val")
    if 0 < rows * size * size <= VAL_HERE_MAX_PIXELS:
        parts = [_eval_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}, cfg.augment, size)
                 for t in shardset.iter_split(manifest, "val", columns=COLUMNS)]
    else:
        val_ds = stream.read_split(manifest, "val", columns=COLUMNS).map_batches(
            _eval_batch, fn_kwargs={"cfg": cfg.augment, "size": size}, num_cpus=EVAL_TASK_CPUS, batch_size=256)
        if rows * 3 * size * size > VAL_IN_MEMORY_BYTES:
            return {"val": val_ds}, None
        parts = list(val_ds.iter_batches(batch_size=1024, batch_format="numpy"))
    # Eval transforms are deterministic: run them once, and hand every rank the same
    # uint8 arrays through the object store instead of a pipeline per rank per epoch.
    val_ref = ray.put({"image": np.concatenate([b["image"] for b in parts]),
                       "label": np.concatenate([b["label"] for b in parts])})
    return {}, val_ref


def _trainer(cfg: Config, spec: RunSpec, datasets: dict[str, Any], name: str, storage_root: str,
             val_rows: int) -> TorchTrainer:
    res = train_resources(cfg, ray.cluster_resources().get("CPU", 1.0))
    resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        resources["GPU"] = res.gpus_per_worker
    fs, fs_path = storage.pyarrow_filesystem(storage_root)
    log.info("train: run %s, %d workers x %.2f CPU (%.2f CPU left for Ray Data), %d train / %d val images",
             name, cfg.train.num_workers, res.cpus_per_worker, res.data_cpus, spec.train_rows, val_rows)
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=fs_path, storage_filesystem=fs if storage.is_remote(storage_root) else None,
            checkpoint_config=CheckpointSaver.ray_config(cfg.train.num_to_keep),
            # worker failures restart in _fit_restarting, which knows bad input from bad luck
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
        datasets=datasets or None,  # the training stream is built in each worker
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def _fit(make_trainer: Callable[[], TorchTrainer], cfg: Config, name: str, run_uri: str,
         quiet: bool) -> ray.train.Result:
    """Train under the stall watchdog, printing epoch lines as they land."""
    with Watchdog(f"training run {name}", run_uri, cfg.ray.stall_timeout_s) as dog:
        follower = MetricsFollower(run_uri, cfg.train.epochs, quiet, beat=dog.beat)
        follower.start()
        try:
            return _fit_restarting(make_trainer, cfg.train.max_failures, name)
        finally:
            follower.stop()


def _fit_restarting(make_trainer: Callable[[], TorchTrainer], max_failures: int, name: str) -> ray.train.Result:
    """``fit()``; after a worker failure, fit again (the workers resume from the run's
    latest checkpoint) up to ``max_failures`` times (-1: no limit), unless the failure
    is bad input, which fails the same way every time: then at once, as a UserError
    naming the cause (Ray Train's own restarts are off: its FailureConfig has no way
    to tell the two apart)."""
    restarts = 0
    while True:
        try:
            result = make_trainer().fit()
            if result.error is None:
                return result
            error = result.error
        except Exception as e:  # noqa: BLE001 - Ray wraps worker errors: classified by their cause
            error = e
        if not failures.retryable(error) or 0 <= max_failures <= restarts:
            raise failures.as_error(error, f"training run {name}") from error
        restarts += 1
        log.warning("training run %s: %s; restarting the workers from the latest checkpoint (%d of %s)",
                    name, failures.first_line(failures.cause(error)), restarts,
                    max_failures if max_failures >= 0 else "unlimited")


def run(cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """``imgpipe train``: train on ``data.manifest``; returns the summary dict.

    Holds the run's lease (``RUN/_lease.json``) throughout: a second ``imgpipe train``
    with the same ``train.run_name`` exits 2 while this one runs."""
    manifest = _manifest(cfg)
    name = run_name(cfg)
    storage_root = _storage_root(cfg)
    run_uri = storage.join(storage_root, name)
    with lease.hold(run_uri, what=f"training run {name}"):
        record = _check_dataset(run_uri, name, manifest)  # before anything is written or trained
        state = pretrained_state(cfg, len(manifest.classes))
        ensure_ray(cfg, quiet=quiet)
        preflight.check(preflight.train_request(cfg, ray.cluster_resources().get("CPU", 1.0)), "train", cfg)
        if record is not None:
            storage.write_json(storage.join(run_uri, names.RUN_DATASET), record)
        storage.write_bytes(storage.join(run_uri, names.RUN_CONFIG), config.dump(cfg).encode())
        t0 = time.time()
        result = _train(cfg, manifest, name, storage_root, None if state is None else ray.put(state), quiet)
        return _summary(cfg, manifest, name, storage_root, result, time.time() - t0, quiet)


def _train(cfg: Config, manifest: shardset.Manifest, name: str, storage_root: str, pretrained_ref: Any,
           quiet: bool) -> ray.train.Result:
    """Prepare val, and train."""
    run_uri = storage.join(storage_root, name)
    try:
        datasets, val_ref = _val(cfg, manifest)
    except RayError as e:
        raise failures.as_error(e, f"training run {name}") from e
    spec = RunSpec(config=cfg, manifest=manifest, meta=_meta(cfg, manifest, run_uri), run_uri=run_uri,
                   pretrained_ref=pretrained_ref, val_ref=val_ref)
    return _fit(lambda: _trainer(cfg, spec, datasets, name, storage_root, manifest.rows("val")),
                cfg, name, run_uri, quiet)


def _summary(cfg: Config, manifest: shardset.Manifest, name: str, storage_root: str, result: ray.train.Result,
             seconds: float, quiet: bool) -> dict[str, Any]:
    """Score the best checkpoint on the test split, write the report; the run's summary."""
    run_uri = storage.join(storage_root, name)
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get(SCORE, -1.0))
    best_uri = _checkpoint_uri(storage_root, best_ckpt.path)
    history = read_history(run_uri)
    train_seen = sum(h["train_images"] for h in history)
    epoch_secs = sum(h["epoch_seconds"] for h in history)
    test, report_uri = _test_and_report(cfg, run_uri, best_uri, manifest, history, quiet)
    return {
        "test_accuracy": test["accuracy"] if test else None, "test": test, "report": report_uri,
        "run": name, "run_uri": run_uri, "best_checkpoint_uri": best_uri,
        "best_val_accuracy": best_metrics.get(SCORE), "best_epoch": best_metrics.get("epoch"),
        "epochs": len(history), "final": result.metrics, "seconds": round(seconds, 2),
        "train_images_per_second": round(train_seen / max(epoch_secs, 1e-9), 1),
        "data_manifest_sha256": manifest.sha256, "classes": manifest.classes,
    }


def _meta(cfg: Config, manifest: shardset.Manifest, run_uri: str) -> dict[str, Any]:
    """meta.json of every checkpoint of the run (each adds its metrics and epoch)."""
    return {"arch": cfg.model.arch, "classes": manifest.classes, "image_size": cfg.data.image_size,
            "mean": cfg.augment.mean, "std": cfg.augment.std, "eval_preset": cfg.augment.preset,
            "config": config.to_dict(cfg), "data_manifest_sha256": manifest.sha256,
            "data_manifest": manifest.root, "run": run_uri, "pretrained": cfg.model.pretrained}


def _test_and_report(cfg: Config, run_uri: str, best_uri: str, manifest: shardset.Manifest,
                     history: list[dict[str, Any]], quiet: bool) -> tuple[dict[str, Any] | None, str]:
    """Score the best checkpoint on the test split (per-image results under RUN/report/);
    write report.html and TensorBoard files."""
    test = None
    if manifest.rows("test") > 0:
        test = evaluate.run(best_uri, manifest.root, "test", cfg, quiet=quiet,
                            predictions_uri=storage.join(run_uri, names.REPORT_DIR, names.EVAL_PREDICTIONS))
    if not storage.is_remote(run_uri):
        report.write_tensorboard(run_uri, history)
    uri = report.write_train_report(run_uri, evaluation=test, data_uri=manifest.root if test else None)
    if not quiet:
        acc = f"test accuracy {test['accuracy']:.4f}; " if test else ""
        print(f"train: {acc}report {uri}", file=sys.stderr, flush=True)
    return test, uri


def _checkpoint_uri(storage_root: str, ckpt_path: str) -> str:
    """Ray Train's checkpoint path (no scheme on remote filesystems) -> a storage URI."""
    if storage.is_remote(storage_root):
        return f"{storage_root.split('://', 1)[0]}://{ckpt_path}"
    return ckpt_path
