"""Batch inference: stored images -> predictions Parquet, exactly once, resumable,
one model per output folder.

Pipeline (one Ray Data job; the stages are :mod:`pipeline.inference.tasks` and
:mod:`pipeline.inference.actors`)::

    listing -> read bytes (parallel tasks) -> decode + eval transform (CPU actor pool)
            -> model (actor pool; GPU with predict.num_gpus) -> Parquet writer tasks

Output (docs/design.md, "Predictions"): ``DST/part-<h>.parquet`` (:data:`PRED_SCHEMA`),
undecodable images quarantined in ``DST/_errors/part-<h>.pq`` (source, image_id, error),
and ``DST/_SUCCESS`` written last, listing the committed files. ``<h>`` hashes the
sources in the file, the model and the run id (:func:`pipeline.inference.tasks.part_digest`),
so a retried task rewrites the same file, while a later run never writes over a committed
one. Only the prediction files end in ``.parquet``: the state and error tables are
Parquet named ``*.pq``, so ``'DST/**/*.parquet'`` globs read predictions only.

Ownership: a committed output belongs to one model (name, weights sha256) and top-k.
Another one exits 2 naming both, unless ``predict.overwrite`` (``--overwrite``): then
the new run writes new files beside the old ones, replaces ``_SUCCESS`` in one atomic
write, and only then deletes the old files. Readers that go through ``_SUCCESS`` see
the old committed set or the new one, never a mix. An output scored through
``NAME@champion`` follows the champion: a new champion replaces it the same way.
The run holds the output's lease (:mod:`pipeline.ops.lease`) throughout, so a second
run into the same output exits 2 while this one lives.

Exactly once: a run first snapshots its input listing in ``DST/_state/``. Rerun after
a crash (once its lease expired), it reuses that listing (no re-listing of a huge prefix)
and skips every source already in an uncommitted part by the same model, so nothing is
scored twice. With ``--skip-existing`` it also skips sources the committed output
already scored with the same model version, when their size/ETag/mtime did not change
(nightly runs over a growing prefix cost only the new images). The commit step keeps
exactly one row per input source and deletes files it does not list.

Memory does not grow with the input (issue #18): the listing is streamed into the snapshot
in row groups (:func:`pipeline.data.listings.write_input_listing`) that the read tasks read
one each (:func:`pipeline.inference.tasks.read_snapshot`), and Ray Data may hold at most
:func:`store_budget` bytes of rows in the object store.

Bad images are quarantined; the run fails (nothing committed) only when more than
``predict.max_bad_fraction`` of the images and at least ``predict.max_bad_min_count``
of them are bad. Errors inside Ray tasks reach the user as their cause
(:mod:`pipeline.ops.failures`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from pipeline import names, storage
from pipeline.config import Config
from pipeline.data import listings
from pipeline.data.shardset import Manifest
from pipeline.errors import JobFailed, UserError
from pipeline.inference import actors, tasks
from pipeline.inference.tasks import ERROR_SCHEMA, PRED_SCHEMA  # noqa: F401 - the output schemas, part of predict's API
from pipeline.names import ERRORS_DIR, PREDICT_SIDE_TABLE, STATE_DIR, SUCCESS
from pipeline.ops import console, failures, lease
from pipeline.ops.runtime import PredictResources
from pipeline.ops.watchdog import Watchdog
from pipeline.report import report

log = logging.getLogger("imgpipe")

LEGACY_STATE = ("listing.parquet", "committed_listing.parquet")  # _state/ tables before the .pq names
# Ray Data's object-store budget for one run (issue #18): without it Ray Data may buffer up
# to half the object store (GBs) of read and decoded rows ahead of the model, so a run's
# peak memory grew with its number of images until that cap. The budget holds
# STORE_BATCHES model batches per model actor, an image counted as its decoded uint8
# input plus STORED_IMAGE_BYTES of encoded bytes and ids, and never less than STORE_MIN_BYTES;
# plus one output file's scored rows (the writer waits for predict.rows_per_file of them).
STORE_BATCHES = 8
STORED_IMAGE_BYTES = 16 * 1024
STORE_MIN_BYTES = 64 * 2**20
SCORED_ROW_BYTES = 1024  # a scored row: ids, source, top-k labels, scores and names
BAD_SHOWN = 10  # bad images named in the summary, _SUCCESS and the log


@dataclass
class Attempt:
    """This run's identity and input: a fresh run, or the resumption of a crashed one."""

    run_id: str
    resuming: bool
    listing: str | None  # the listing snapshot (uri, size, version); None for ``DATASET:split`` input
    manifest: Manifest | None
    split: str | None
    rows: int = 0  # in the listing snapshot

    @property
    def total(self) -> int:
        """Images in the input."""
        return self.manifest.rows(self.split) if self.manifest is not None else self.rows


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
    topk: int  # labels per row: predict.topk, at most the model's classes
    replace: bool = False  # the commit replaces the committed output instead of adding to it
    model_ref: str = ""  # --model as given (NAME@champion, NAME@vN, a URI)
    resumed: int = 0  # of ``skip``: sources an interrupted attempt already scored (uncommitted parts)
    scoring_s: float = 0.0  # seconds spent scoring in this run (the rate's denominator)
    laps: Laps | None = None  # seconds by phase


@dataclass
class Laps:
    """Seconds by phase of one run, contiguous from its start: each :meth:`lap` ends the
    phase named and starts the next (``phase_seconds`` in the summary)."""

    t: float  # time.time() when the current phase began
    seconds: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.t, 3)
        self.t = now


# --------------------------------------------------------------------- planning


def _begin(dst: str, src: str, scorer: actors.Scorer, laps: Laps) -> Attempt:
    """Resume the crashed attempt on the same input and model, or start a new one
    (snapshotting its listing first)."""
    state = storage.join(dst, STATE_DIR)
    attempt_uri, listing_uri = storage.join(state, names.PREDICT_ATTEMPT), storage.join(state, names.PREDICT_LISTING)
    prev = storage.read_json(attempt_uri) if storage.exists(attempt_uri) else None
    resuming = bool(prev and not prev.get("committed") and prev.get("model") == scorer.name
                    and prev.get("input") == src)
    manifest, split, rows = None, None, 0
    if resuming and prev.get("listing") and storage.exists(listing_uri):
        rows, _ = listings.snapshot_shape(listing_uri)
        log.info("predict: resuming run %s (reusing its listing of %d images)", prev["run_id"], rows)
    elif listings.parse(src).kind == "split":
        _, manifest, split = listings.read_input(src)
        if list(manifest.classes) != scorer.classes:
            raise UserError(f"model {scorer.name} classes {scorer.classes} do not match dataset classes "
                            f"{manifest.classes}")
    else:  # streamed into the snapshot, never whole in memory (the snapshot is the listing)
        rows = listings.write_input_listing(src, listing_uri)
    laps.lap("listing")
    run_id = prev["run_id"] if resuming else uuid.uuid4().hex[:12]
    if not resuming:
        storage.write_json(attempt_uri, {"run_id": run_id, "model": scorer.name, "input": src, "committed": False,
                                         "listing": manifest is None, "started": time.time()})
    laps.lap("snapshot")
    return Attempt(run_id, resuming, listing_uri if manifest is None else None, manifest, split, rows)


def _is_part(name: str, error_dir: bool) -> bool:
    """A predictions file (``part-*.parquet``) or, in ``_errors/``, an error file
    (``part-*.pq``; ``part-*.parquet`` from before the ``.pq`` names)."""
    ok = name.endswith(".parquet") or (error_dir and name.endswith(PREDICT_SIDE_TABLE))
    return name.startswith("part-") and ok


def _existing(dst: str, model_name: str) -> Existing:
    """The committed ``_SUCCESS``, every part file with its model, the sources by this model."""
    success = None
    if storage.exists(storage.join(dst, SUCCESS)):
        success = storage.read_json(storage.join(dst, SUCCESS))
    files: dict[str, str] = {}
    done: set[str] = set()
    for sub in ("", ERRORS_DIR):
        for name in storage.listdir(storage.join(dst, sub) if sub else dst):
            if not _is_part(name, bool(sub)):
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
    prev_uri = storage.join(dst, STATE_DIR, names.PREDICT_COMMITTED_LISTING)
    if not storage.exists(prev_uri):
        return set()
    prev = storage.read_table(prev_uri, ["uri", "version"])
    prev_version = dict(zip(prev.column("uri").to_pylist(), prev.column("version").to_pylist()))
    listing = storage.read_table(attempt.listing, ["uri", "version"])
    now = zip(listing.column("uri").to_pylist(), listing.column("version").to_pylist())
    return {u for u, v in now if prev_version.get(u) == v and u in before.done}


def _conflict(success: dict[str, Any] | None, scorer: actors.Scorer, topk: int) -> str | None:
    """How the committed output differs from what this run writes (None: it does not)."""
    if not success:
        return None
    theirs = success.get("model")
    if theirs != scorer.name:
        return f"scored by {theirs}"
    old, new = success.get("weights_sha256"), scorer.meta.get("weights_sha256")
    if old and new and old != new:
        return f"scored by {theirs} with other weights (sha256 {old[:12]}, now {new[:12]})"
    k = success.get("topk")
    if k is not None and k != topk:
        return f"scored by {theirs} with top-{k} (this run: top-{topk})"
    return None


def _follows_champion(model_ref: str, success: dict[str, Any]) -> bool:
    """``NAME@champion`` into an output scored by another version of NAME: the output
    follows the champion (nightly re-scoring after a promotion)."""
    name, _, alias = model_ref.rpartition("@")
    committed = str(success.get("model") or "")
    return alias == "champion" and bool(name) and committed.startswith(f"{name}@v")


def _replaces(dst: str, before: Existing, scorer: actors.Scorer, topk: int, model_ref: str, cfg: Config) -> bool:
    """Whether this run replaces the committed output; exit 2 when it would mix two models'
    (or two top-k settings') predictions without ``predict.overwrite``."""
    why = _conflict(before.success, scorer, topk)
    if why is None:
        return cfg.predict.overwrite
    model_changed = before.success.get("model") != scorer.name
    if cfg.predict.overwrite or (model_changed and _follows_champion(model_ref, before.success)):
        log.warning("predict: replacing the predictions in %s (%s) with %s's", dst, why, scorer.name)
        return True
    raise UserError(f"predict --output {dst} holds committed predictions {why}; this run scores with "
                    f"{scorer.name} (top-{topk}) and would mix the two: pass --overwrite to replace them "
                    "(readers see the old or the new set, never a mix), or choose another --output")


def _plan(model_ref: str, src: str, dst: str, scorer: actors.Scorer, cfg: Config, t0: float,
          laps: Laps) -> Job:
    topk = max(1, min(cfg.predict.topk, len(scorer.classes)))
    before = _existing(dst, scorer.name)
    replace = _replaces(dst, before, scorer, topk, model_ref, cfg)  # before any write: a refusal changes nothing
    laps.lap("existing")
    attempt = _begin(dst, src, scorer, laps)
    pending: set[str] = set()
    if attempt.resuming:
        pending = {f for f, m in before.files.items() if f not in before.committed and m == scorer.name}
    skip = _sources(dst, pending)
    resumed = len(skip)
    if cfg.predict.skip_existing and not replace:
        skip |= _unchanged(dst, attempt, before, scorer.name)
    laps.lap("skip")
    return Job(src, dst, scorer, attempt, before, pending, skip, t0, topk, replace, model_ref, resumed, laps=laps)


# ---------------------------------------------------------------------- scoring


def _input(job: Job, opts: storage.StorageOptions) -> ray.data.Dataset | None:
    """The rows still to score (None when nothing is left)."""
    a = job.attempt
    if a.manifest is not None:
        return tasks.read_split(a.manifest, a.split, frozenset(job.skip))
    if a.rows <= len(job.skip):  # every listed source is skipped (skip holds listed sources only)
        return None
    if not job.skip:
        return tasks.read_snapshot(a.listing, opts)
    remaining = storage.join(job.dst, STATE_DIR, names.PREDICT_REMAINING)
    if not listings.write_remaining(a.listing, pa.array(list(job.skip), pa.string()), remaining):
        return None
    return tasks.read_snapshot(remaining, opts)


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


def store_budget(cfg: Config, image_size: int) -> int:
    """Bytes of Ray Data blocks one predict run may hold in the object store at once."""
    p = cfg.predict
    per_image = 3 * image_size * image_size + STORED_IMAGE_BYTES
    ahead = max(STORE_MIN_BYTES, STORE_BATCHES * p.batch_size * p.model_actors * per_image)
    return ahead + p.rows_per_file * SCORED_ROW_BYTES


def _score(ds: ray.data.Dataset, job: Job, cfg: Config, res: PredictResources, quiet: bool) -> list[dict[str, Any]]:
    """Run the job; one result row (see :func:`pipeline.inference.tasks.write_part`) per part
    file written. An error inside a task or actor is raised as its cause (exit 2 for bad
    input, 1 otherwise), never as Ray's wrapper alone."""
    opts = storage.default_options()
    p = cfg.predict
    spec = actors.ModelSpec(run_id=job.attempt.run_id, topk=job.topk, batch_size=p.batch_size,
                            threads=res.model_threads, compile_model=p.compile, gpu_decode=p.gpu_decode)
    # The writer asks for no CPU. With a slot (0.2, or even 0.05 with a reserve for it) Ray
    # Data's budget gave it none while backpressured read tasks held theirs: two of three
    # 10^5-image runs wrote their first file 81-87% of the way through scoring, so a kill then
    # lost nearly all of it (benchmarks/README.md, "The writer"). A file is ~0.1 CPU-s; Ray may place
    # the task on a head node started with num-cpus 0 (it moves one file's rows, ~10 MB).
    ds = actors.score(ds, job.scorer, spec, cfg, res).map_batches(
        tasks.write_part, fn_kwargs={"dst": job.dst, "model_name": job.scorer.name, "run_id": job.attempt.run_id,
                                     "opts": opts},
        batch_size=p.rows_per_file, num_cpus=0)
    # a fixed budget, whatever the number of images: the queues ahead of the model stay bounded
    ds.context.execution_options.resource_limits = ds.context.execution_options.resource_limits.copy(
        object_store_memory=store_budget(cfg, job.scorer.image_size))
    results: list[dict[str, Any]] = []
    t_run = time.time()
    # one bar per run: images done / total (those already scored count as done from the
    # start, so the rate and ETA are this run's); it moves as each part file is written
    progress = console.bar(job.attempt.total, "predict", quiet=quiet, initial=len(job.skip))
    with Watchdog(f"predict into {job.dst}", storage.join(job.dst, STATE_DIR), cfg.ray.stall_timeout_s) as dog:
        try:
            for r in _rows(ds, dog):
                results.append(r)
                progress.update(r["rows"] + r["errors"])
        except Exception as e:  # noqa: BLE001 - Ray's wrappers -> the cause, as UserError / JobFailed
            raise failures.as_error(e, f"predict into {job.dst}") from e
        finally:
            progress.close()
            job.scoring_s = time.time() - t_run
    return results


def _check_config(cfg: Config) -> None:
    p = cfg.predict
    if not 0 <= p.max_bad_fraction <= 1:
        raise UserError(f"predict.max_bad_fraction must be in [0, 1], got {p.max_bad_fraction}")
    if p.max_bad_min_count < 0:
        raise UserError(f"predict.max_bad_min_count must be >= 0, got {p.max_bad_min_count}")


def _refuse_file(dst: str) -> None:
    """``--output`` naming an existing file (not a folder): one line, exit 2."""
    if storage.exists(dst) and not storage.isdir(dst):
        raise UserError(f"predict --output {dst} is a file; expected a folder (or a path that does not exist yet)")


def run(model_ref: str, src: str, dst: str, cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """``imgpipe predict``: score every image of ``src`` into ``dst``, holding ``dst``'s
    lease (:func:`pipeline.ops.lease.hold`, ``ray.lease_ttl_s``) until the commit is done."""
    t0 = time.time()
    _check_config(cfg)
    dst = storage.normalize(dst)
    _refuse_file(dst)
    scorer = actors.load_scorer(model_ref, cfg)  # fail at start (exit 2) if the model is unusable
    laps = Laps(t0)
    laps.lap("model")
    with lease.hold(dst, what="predict output", ttl_s=cfg.ray.lease_ttl_s) as held:
        job = _plan(model_ref, src, dst, scorer, cfg, t0, laps)
        res = actors.start(cfg, scorer, "predict", quiet)
        laps.lap("start")
        ds = _input(job, storage.default_options())
        results = _score(ds, job, cfg, res, quiet) if ds is not None else []
        laps.lap("scoring")
        return _commit(job, results, cfg, held)


# ----------------------------------------------------------------------- commit


def _is_error_file(f: str) -> bool:
    return f.startswith(ERRORS_DIR + "/")


def _pruned_name(f: str, run_id: str) -> str:
    """Where run ``run_id`` writes committed file ``f`` without its re-scored rows: a new
    name, so readers of the current ``_SUCCESS`` keep reading ``f`` unchanged."""
    folder, _, name = f.rpartition("/")
    suffix = PREDICT_SIDE_TABLE if _is_error_file(f) and name.endswith(PREDICT_SIDE_TABLE) else ".parquet"
    digest = hashlib.sha1(f"{f}|pruned|{run_id}".encode()).hexdigest()[:20]
    return f"{folder}/part-{digest}{suffix}" if folder else f"part-{digest}{suffix}"


def _prune_committed(job: Job, new: set[str]) -> tuple[set[str], set[str]]:
    """Incremental run: keep the committed files by this model, without the rows scored
    again this run (written under new names); returns (files still holding rows, every
    pruned name, so a crashed attempt's prunes are not taken for fresh scores)."""
    olds = [f for f in job.before.success.get("files", []) + job.before.success.get("error_files", [])
            if f not in new and job.before.files.get(f) == job.scorer.name]
    renamed = {f: _pruned_name(f, job.attempt.run_id) for f in olds}
    rescored = pa.array(sorted(_sources(job.dst, new - set(renamed.values()))), pa.string())
    keep: set[str] = set()
    for f, g in renamed.items():
        t = storage.read_table(storage.join(job.dst, f))
        kept = t.filter(pc.invert(pc.is_in(t.column("source"), value_set=rescored)))
        if kept.num_rows == t.num_rows:
            keep.add(f)
        elif kept.num_rows:
            storage.write_table(storage.join(job.dst, g), kept)
            keep.add(g)
    return keep, set(renamed.values())


def _select(job: Job, results: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(prediction files, error files) the commit lists."""
    new = {r["file"] for r in results if r["file"]}
    new |= {f"{ERRORS_DIR}/{r['error_file']}" for r in results if r["error_file"]}
    new |= job.pending
    keep_old, pruned = set(), set()
    if job.skip and job.before.success and not job.replace:
        keep_old, pruned = _prune_committed(job, new)
    chosen = (new - pruned) | keep_old
    return sorted(f for f in chosen if not _is_error_file(f)), sorted(f for f in chosen if _is_error_file(f))


def _num_rows(uri: str) -> int:
    return pq.read_metadata(io.BytesIO(storage.read_bytes(uri))).num_rows


def _bad_images(dst: str, error_files: list[str], limit: int = BAD_SHOWN) -> list[dict[str, str]]:
    """The first ``limit`` quarantined images: source and error."""
    out: list[dict[str, str]] = []
    for f in error_files:
        if len(out) >= limit:
            break
        t = storage.read_table(storage.join(dst, f), ["source", "error"])
        out += t.slice(0, limit - len(out)).to_pylist()
    return out


def _write_commit(job: Job, summary: dict[str, Any]) -> None:
    """Write ``_SUCCESS`` (the commit point: one atomic write), then the state, then delete
    the files it does not list (older runs', another model's, a crashed attempt's)."""
    storage.write_json(storage.join(job.dst, SUCCESS), summary)
    state = storage.join(job.dst, STATE_DIR)
    if job.attempt.listing is not None:  # the snapshot's stored bytes (~20 B an image), never decoded into rows
        storage.write_bytes(storage.join(state, names.PREDICT_COMMITTED_LISTING), storage.read_bytes(job.attempt.listing))
    else:  # DATASET:split input: no listing to compare with next time
        storage.remove(storage.join(state, names.PREDICT_COMMITTED_LISTING))
    storage.write_json(storage.join(state, names.PREDICT_ATTEMPT), {"run_id": job.attempt.run_id, "model": job.scorer.name,
                                                              "input": job.src, "committed": True})
    listed = set(summary["files"]) | set(summary["error_files"])
    for f in job.before.files:
        if f not in listed:
            storage.remove(storage.join(job.dst, f))
    # old tables ('DST/**/*.parquet' would read them as predictions), and this run's leftover list
    for name in (*LEGACY_STATE, names.PREDICT_REMAINING):
        storage.remove(storage.join(state, name))


def _check_bad(job: Job, errors: int, error_files: list[str], cfg: Config) -> None:
    """Fail (nothing committed) when more than ``predict.max_bad_fraction`` of the images
    and at least ``predict.max_bad_min_count`` of them are bad."""
    p, total = cfg.predict, job.attempt.total
    if total and errors / total > p.max_bad_fraction and errors >= p.max_bad_min_count:
        first = ", ".join(f"{b['source']} ({b['error'].split(':', 1)[0]})" for b in _bad_images(job.dst, error_files))
        raise JobFailed(f"{errors} of {total} images could not be decoded ({errors / total:.2%} > "
                        f"predict.max_bad_fraction {p.max_bad_fraction:.2%} and >= predict.max_bad_min_count "
                        f"{p.max_bad_min_count}): {first}; see {job.dst}/{ERRORS_DIR}/ ; not committed")


def _commit(job: Job, results: list[dict[str, Any]], cfg: Config, held: lease.Held) -> dict[str, Any]:
    """Select the output files, enforce one row per source, write ``_SUCCESS`` last."""
    files, error_files = _select(job, results)
    rows = sum(_num_rows(storage.join(job.dst, f)) for f in files)
    errors = sum(_num_rows(storage.join(job.dst, f)) for f in error_files)
    _check_bad(job, errors, error_files, cfg)
    bad = _bad_images(job.dst, error_files)
    seconds = time.time() - job.t0
    held.check()  # never commit over a run that took the lease over
    _write_commit(job, {
        "format": 2, "rows": rows, "errors": errors, "files": files, "error_files": error_files,
        "model": job.scorer.name, "model_ref": job.model_ref, "model_uri": job.scorer.uri,
        "weights_sha256": job.scorer.meta.get("weights_sha256"), "topk": job.topk, "run_id": job.attempt.run_id,
        "input": job.src, "bad_images": bad, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if bad:
        log.warning("predict: %d image(s) quarantined in %s/%s/, e.g. %s", errors, job.dst, ERRORS_DIR,
                    ", ".join(f"{b['source']} ({b['error'].split(':', 1)[0]})" for b in bad[:3]))
    scored = sum(r["rows"] + r["errors"] for r in results)
    out = {"predictions_uri": job.dst, "rows": rows, "errors": errors, "files": len(files),
           "scored": scored, "skipped": len(job.skip), "model": job.scorer.name, "run_id": job.attempt.run_id,
           "replaced": job.replace, "bad_images": bad,
           "resumed": job.resumed, "seconds": round(seconds, 3), "scoring_seconds": round(job.scoring_s, 3),
           # this run's images over this run's scoring time; None: nothing was left to score
           "images_per_second": round(scored / max(job.scoring_s, 1e-9), 1) if scored else None}
    labelled = sum(r["labelled"] for r in results)
    if labelled:
        out["accuracy"] = round(sum(r["correct"] for r in results) / labelled, 6)
    job.laps.lap("commit")
    out["report"] = report.write_predict_report(job.dst)
    job.laps.lap("report")
    out["phase_seconds"] = dict(job.laps.seconds)
    log.info("predict: %d rows, %d errors in %d files -> %s (%.1fs); %s", rows, errors, len(files), job.dst,
             seconds, rate_line(scored, job))
    return out


def rate_line(scored: int, job: Job) -> str:
    """What this run scored and how fast, and what earlier runs had already scored."""
    done_before = []
    if job.resumed:
        done_before.append(f"{job.resumed} already scored by the interrupted run {job.attempt.run_id}")
    if len(job.skip) > job.resumed:
        done_before.append(f"{len(job.skip) - job.resumed} unchanged since the last commit")
    before = f" ({', '.join(done_before)})" if done_before else ""
    if not scored:
        return f"nothing left to score{before}"
    return f"scored {scored} images in this run, {scored / max(job.scoring_s, 1e-9):.0f} img/s{before}"


def read_predictions(dst: str) -> pa.Table:
    """The committed predictions of ``dst`` (only files listed in ``_SUCCESS``)."""
    try:
        success = storage.read_json(storage.join(dst, SUCCESS))
    except storage.NotFound:
        raise UserError(f"no committed predictions at {dst} (missing {SUCCESS})") from None
    tables = [storage.read_table(storage.join(dst, f)) for f in success["files"]]
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()
