"""Batch inference: stored images -> predictions Parquet, exactly once, resumable.

Pipeline (one Ray Data job; the stages are :mod:`pipeline.inference.tasks` and
:mod:`pipeline.inference.actors`)::

    listing -> read bytes (parallel tasks) -> decode + eval transform (CPU actor pool)
            -> model (actor pool; GPU with predict.num_gpus) -> Parquet writer tasks

Output (docs/formats.md): ``DST/part-<h>.parquet`` (:data:`PRED_SCHEMA`), undecodable
images in ``DST/_errors/part-<h>.parquet`` (source, image_id, error), and
``DST/_SUCCESS`` written last, listing the committed files. ``<h>`` hashes the sources
in the file and the model, so a retried task rewrites the same file instead of adding one.

Exactly once: a run first snapshots its input listing in ``DST/_state/``. Rerun after
a crash, it reuses that listing (no re-listing of a huge prefix) and skips every
source already in an uncommitted part by the same model, so nothing is scored twice.
With ``--skip-existing`` it also skips sources the committed output already scored
with the same model version, when their size/ETag/mtime did not change (nightly
runs over a growing prefix cost only the new images). The commit step keeps exactly
one row per input source and deletes files it does not list.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from pipeline import storage
from pipeline.config import Config
from pipeline.data import listings
from pipeline.data.shardset import Manifest
from pipeline.errors import JobFailed, UserError
from pipeline.inference import actors, tasks
from pipeline.inference.tasks import ERROR_SCHEMA, PRED_SCHEMA  # noqa: F401 - the output schemas, part of predict's API
from pipeline.names import ERRORS_DIR, STATE_DIR, SUCCESS
from pipeline.ops.runtime import READ_TASK_CPUS, PredictResources
from pipeline.ops.watchdog import Watchdog
from pipeline.report import report

log = logging.getLogger("imgpipe")

# DST/_state/: the input listing snapshot, the listing of the last commit, this attempt
LISTING = "listing.parquet"
COMMITTED_LISTING = "committed_listing.parquet"
ATTEMPT = "attempt.json"


@dataclass
class Attempt:
    """This run's identity and input: a fresh run, or the resumption of a crashed one."""

    run_id: str
    resuming: bool
    listing: pa.Table | None  # uri, size, version; None for ``DATASET:split`` input
    manifest: Manifest | None
    split: str | None

    @property
    def total(self) -> int:
        """Images in the input."""
        return self.manifest.rows(self.split) if self.manifest is not None else self.listing.num_rows


@dataclass
class Existing:
    """What ``DST`` holds before this run scores anything."""

    success: dict[str, Any] | None  # the committed ``_SUCCESS``
    files: dict[str, str]  # every part file (error files as ``_errors/<name>``) -> its model
    done: set[str]  # sources in part files by this run's model

    @property
    def committed(self) -> set[str]:
        return set(self.success.get("files", []) + self.success.get("error_files", [])) if self.success else set()


@dataclass
class Job:
    """One ``imgpipe predict`` run, planned before anything is scored."""

    src: str
    dst: str
    scorer: actors.Scorer
    attempt: Attempt
    before: Existing
    pending: set[str]  # uncommitted part files by this model (a crashed attempt's): kept
    skip: set[str]  # sources this run does not score again
    t0: float  # time.time() at the start


# --------------------------------------------------------------------- planning


def _begin(dst: str, src: str, scorer: actors.Scorer) -> Attempt:
    """Resume the crashed attempt on the same input and model, or start a new one
    (snapshotting its listing first)."""
    state = storage.join(dst, STATE_DIR)
    attempt_uri, listing_uri = storage.join(state, ATTEMPT), storage.join(state, LISTING)
    prev = storage.read_json(attempt_uri) if storage.exists(attempt_uri) else None
    resuming = bool(prev and not prev.get("committed") and prev.get("model") == scorer.name
                    and prev.get("input") == src)
    if resuming and prev.get("listing") and storage.exists(listing_uri):
        listing, manifest, split = storage.read_table(listing_uri), None, None
        log.info("predict: resuming run %s (reusing its listing of %d images)", prev["run_id"], listing.num_rows)
    else:
        listing, manifest, split = listings.read_input(src)
    if manifest is not None and list(manifest.classes) != scorer.classes:
        raise UserError(f"model {scorer.name} classes {scorer.classes} do not match dataset classes "
                        f"{manifest.classes}")
    run_id = prev["run_id"] if resuming else uuid.uuid4().hex[:12]
    if not resuming:
        if manifest is None:
            storage.write_table(listing_uri, listing)
        storage.write_json(attempt_uri, {"run_id": run_id, "model": scorer.name, "input": src, "committed": False,
                                         "listing": manifest is None, "started": time.time()})
    return Attempt(run_id, resuming, listing if manifest is None else None, manifest, split)


def _existing(dst: str, model_name: str) -> Existing:
    """The committed ``_SUCCESS``, every part file with its model, the sources by this model."""
    success = None
    if storage.exists(storage.join(dst, SUCCESS)):
        success = storage.read_json(storage.join(dst, SUCCESS))
    files: dict[str, str] = {}
    done: set[str] = set()
    for sub in ("", ERRORS_DIR):
        for name in storage.listdir(storage.join(dst, sub) if sub else dst):
            if not (name.startswith("part-") and name.endswith(".parquet")):
                continue
            rel = f"{sub}/{name}" if sub else name
            t = storage.read_table(storage.join(dst, rel), ["source"] if sub else ["source", "model"])
            model = t.column("model")[0].as_py() if (not sub and t.num_rows) else model_name
            files[rel] = model
            if model == model_name:
                done.update(t.column("source").to_pylist())
    return Existing(success, files, done)


def _sources(dst: str, files: set[str]) -> set[str]:
    out: set[str] = set()
    for f in files:
        out.update(storage.read_table(storage.join(dst, f), ["source"]).column("source").to_pylist())
    return out


def _unchanged(dst: str, attempt: Attempt, before: Existing, model_name: str) -> set[str]:
    """``--skip-existing``: sources the last commit scored with this model whose version
    (size/ETag/mtime) is the same now."""
    if not (before.success and before.success.get("model") == model_name and attempt.listing is not None):
        return set()
    prev_uri = storage.join(dst, STATE_DIR, COMMITTED_LISTING)
    if not storage.exists(prev_uri):
        return set()
    prev = storage.read_table(prev_uri)
    prev_version = dict(zip(prev.column("uri").to_pylist(), prev.column("version").to_pylist()))
    now = zip(attempt.listing.column("uri").to_pylist(), attempt.listing.column("version").to_pylist())
    return {u for u, v in now if prev_version.get(u) == v and u in before.done}


def _plan(src: str, dst: str, scorer: actors.Scorer, cfg: Config, t0: float) -> Job:
    attempt = _begin(dst, src, scorer)
    before = _existing(dst, scorer.name)
    pending: set[str] = set()
    if attempt.resuming:
        pending = {f for f, m in before.files.items() if f not in before.committed and m == scorer.name}
    skip = _sources(dst, pending)
    if cfg.predict.skip_existing:
        skip |= _unchanged(dst, attempt, before, scorer.name)
    return Job(src, dst, scorer, attempt, before, pending, skip, t0)


# ---------------------------------------------------------------------- scoring


def _input(job: Job, opts: storage.StorageOptions) -> ray.data.Dataset | None:
    """The rows still to score (None when nothing is left)."""
    a = job.attempt
    if a.manifest is not None:
        return tasks.read_split(a.manifest, a.split, frozenset(job.skip))
    todo = a.listing
    if job.skip:
        todo = todo.filter(pc.invert(pc.is_in(todo.column("uri"), value_set=pa.array(sorted(job.skip), pa.string()))))
    todo = todo.append_column("truth", pa.array([-1] * todo.num_rows, pa.int32()))
    return tasks.read_listing(todo, opts)


def _rows(ds: ray.data.Dataset, dog: Watchdog):
    """Iterate ``ds``'s rows, beating the watchdog for each; closes the stream on exit."""
    it = iter(ds.iter_rows())
    try:
        for r in it:
            dog.beat()
            yield r
    finally:
        close = getattr(it, "close", None)
        if close:
            close()


def _score(ds: ray.data.Dataset, job: Job, cfg: Config, res: PredictResources, quiet: bool) -> list[dict[str, Any]]:
    """Run the job; one result row (see :func:`pipeline.inference.tasks.write_part`) per part file written."""
    opts = storage.default_options()
    p = cfg.predict
    spec = actors.ModelSpec(run_id=job.attempt.run_id, topk=p.topk, batch_size=p.batch_size, threads=res.model_threads,
                            compile_model=p.compile, gpu_decode=p.gpu_decode)
    ds = actors.score(ds, job.scorer, spec, cfg, res).map_batches(
        tasks.write_part, fn_kwargs={"dst": job.dst, "model_name": job.scorer.name, "opts": opts},
        batch_size=p.rows_per_file, num_cpus=READ_TASK_CPUS)
    results: list[dict[str, Any]] = []
    scored, t_run = 0, time.time()
    with Watchdog(f"predict into {job.dst}", storage.join(job.dst, STATE_DIR), cfg.ray.stall_timeout_s) as dog:
        for r in _rows(ds, dog):
            results.append(r)
            scored += r["rows"] + r["errors"]
            if not quiet:
                rate = scored / max(time.time() - t_run, 1e-9)
                done = scored + len(job.skip)
                log.info("predict: %d/%d images, %.0f img/s, ETA %.0fs", done, job.attempt.total, rate,
                         (job.attempt.total - done) / max(rate, 1e-9))
    return results


def run(model_ref: str, src: str, dst: str, cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """``imgpipe predict``: score every image of ``src`` into ``dst``."""
    t0 = time.time()
    scorer = actors.load_scorer(model_ref, cfg)  # fail at start (exit 2) if the model is unusable
    job = _plan(src, storage.normalize(dst), scorer, cfg, t0)
    res = actors.start(cfg, scorer, "predict", quiet)
    ds = _input(job, storage.default_options())
    results = _score(ds, job, cfg, res, quiet) if ds is not None else []
    return _commit(job, results, cfg)


# ----------------------------------------------------------------------- commit


def _is_error_file(f: str) -> bool:
    return f.startswith(ERRORS_DIR + "/")


def _prune_committed(job: Job, new: set[str]) -> set[str]:
    """Incremental run: keep the committed files by this model, without the rows
    scored again this run; returns the files still holding rows."""
    rescored = pa.array(sorted(_sources(job.dst, new)), pa.string())
    keep: set[str] = set()
    for f in job.before.success.get("files", []) + job.before.success.get("error_files", []):
        if f in new or job.before.files.get(f) != job.scorer.name:
            continue
        uri = storage.join(job.dst, f)
        t = storage.read_table(uri)
        kept = t.filter(pc.invert(pc.is_in(t.column("source"), value_set=rescored)))
        if kept.num_rows != t.num_rows:
            storage.write_table(uri, kept)
        if kept.num_rows:
            keep.add(f)
    return keep


def _select(job: Job, results: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(prediction files, error files) the commit lists."""
    new = {r["file"] for r in results if r["file"]}
    new |= {f"{ERRORS_DIR}/{r['error_file']}" for r in results if r["error_file"]}
    new |= job.pending
    keep_old = _prune_committed(job, new) if job.skip and job.before.success else set()
    chosen = new | keep_old
    return sorted(f for f in chosen if not _is_error_file(f)), sorted(f for f in chosen if _is_error_file(f))


def _num_rows(uri: str) -> int:
    return pq.read_metadata(io.BytesIO(storage.read_bytes(uri))).num_rows


def _write_commit(job: Job, files: list[str], error_files: list[str], rows: int, errors: int) -> None:
    """Write ``_SUCCESS`` (the commit point), then the state, then delete unlisted files."""
    summary = {"rows": rows, "errors": errors, "files": files, "error_files": error_files,
               "model": job.scorer.name, "model_uri": job.scorer.uri,
               "weights_sha256": job.scorer.meta.get("weights_sha256"), "run_id": job.attempt.run_id,
               "input": job.src, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(job.dst, SUCCESS), summary)
    state = storage.join(job.dst, STATE_DIR)
    if job.attempt.listing is not None:
        storage.write_table(storage.join(state, COMMITTED_LISTING), job.attempt.listing)
    storage.write_json(storage.join(state, ATTEMPT), {"run_id": job.attempt.run_id, "model": job.scorer.name,
                                                      "input": job.src, "committed": True})
    listed = set(files) | set(error_files)
    for f in job.before.files:  # files of older runs or other models that the commit did not select
        if f not in listed:
            storage.remove(storage.join(job.dst, f))


def _commit(job: Job, results: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Select the output files, enforce one row per source, write ``_SUCCESS`` last."""
    files, error_files = _select(job, results)
    rows = sum(_num_rows(storage.join(job.dst, f)) for f in files)
    errors = sum(_num_rows(storage.join(job.dst, f)) for f in error_files)
    total = job.attempt.total
    if total and errors / total > cfg.data.max_bad_fraction:
        raise JobFailed(f"{errors} of {total} images could not be decoded ({errors / total:.2%} > "
                        f"data.max_bad_fraction {cfg.data.max_bad_fraction:.2%}); see {job.dst}/{ERRORS_DIR}/ ; "
                        "not committed")
    seconds = time.time() - job.t0
    _write_commit(job, files, error_files, rows, errors)
    scored = sum(r["rows"] + r["errors"] for r in results)
    out = {"predictions_uri": job.dst, "rows": rows, "errors": errors, "files": len(files),
           "scored": scored, "skipped": len(job.skip), "model": job.scorer.name, "run_id": job.attempt.run_id,
           "seconds": round(seconds, 3), "images_per_second": round(scored / max(seconds, 1e-9), 1)}
    labelled = sum(r["labelled"] for r in results)
    if labelled:
        out["accuracy"] = round(sum(r["correct"] for r in results) / labelled, 6)
    out["report"] = report.write_predict_report(job.dst)
    log.info("predict: %d rows, %d errors in %d files -> %s (%.1fs)", rows, errors, len(files), job.dst, seconds)
    return out


def read_predictions(dst: str) -> pa.Table:
    """The committed predictions of ``dst`` (only files listed in ``_SUCCESS``)."""
    try:
        success = storage.read_json(storage.join(dst, SUCCESS))
    except storage.NotFound:
        raise UserError(f"no committed predictions at {dst} (missing {SUCCESS})") from None
    tables = [storage.read_table(storage.join(dst, f)) for f in success["files"]]
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()
