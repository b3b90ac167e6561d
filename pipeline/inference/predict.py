"""Batch inference: stored images -> predictions Parquet, exactly once, resumable.

Pipeline (one Ray Data job)::

    listing -> read bytes (parallel tasks) -> decode + eval transform (CPU actor pool)
            -> model (actor pool; GPU with predict.num_gpus) -> Parquet writer tasks

Output (DESIGN.md contract): ``DST/part-<h>.parquet`` (image_id, source, label,
label_name, score, topk_labels, topk_scores, model, run_id), undecodable images in
``DST/_errors/part-<h>.parquet`` (source, image_id, error), and ``DST/_SUCCESS``
written last, listing the committed files. ``<h>`` hashes the sources in the file and
the model, so a retried task rewrites the same file instead of adding one.

Exactly once: a run first snapshots its input listing in ``DST/_state/``. Rerun after
a crash, it reuses that listing (no re-listing of a huge prefix) and skips every
source already in an uncommitted part by the same model, so nothing is scored twice.
With ``--skip-existing`` it also skips sources the committed output already scored
with the same model version, when their size/ETag/mtime did not change (nightly
runs over a growing prefix cost only the new images). The commit step keeps exactly
one row per input source and deletes files it does not list.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import images, storage
from pipeline.config import AugmentConfig, Config
from pipeline.data import listings, shardset, stream
from pipeline.errors import JobFailed, UserError
from pipeline.models import artifact
from pipeline.ops import preflight
from pipeline.ops.watchdog import Watchdog

log = logging.getLogger("imgpipe")

SUCCESS = "_SUCCESS"
STATE = "_state"
PRED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source", pa.string()), ("label", pa.int32()),
    ("label_name", pa.string()), ("score", pa.float32()), ("topk_labels", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())), ("model", pa.string()), ("run_id", pa.string()),
])
ERROR_SCHEMA = shardset.ERROR_SCHEMA
LISTING_SCHEMA = listings.LISTING_SCHEMA
READ_BATCH = 64  # images per read task call; threads inside overlap S3 latency


# ------------------------------------------------------------------------- model


def model_id(meta: dict[str, Any], uri: str) -> str:
    """``name@vN`` for registry models, else the checkpoint URI."""
    if meta.get("name") and meta.get("version"):
        return f"{meta['name']}@v{meta['version']}"
    return uri


def resolve(model_ref: str, cfg: Config) -> artifact.ModelArtifact:
    """Resolve and load ``--model`` (registry ref or checkpoint URI); exit 2 if unusable."""
    from pipeline import registry

    uri = registry.resolve_model(model_ref, cfg.registry.uri)
    return artifact.load(uri)


class DecodeBatch:
    """Ray Data actor: bytes -> eval-transformed uint8 CHW; undecodable rows get ``error``."""

    def __init__(self, augment_cfg: dict[str, Any], size: int, preset: str) -> None:
        import torch

        from pipeline.transforms import EvalPreset

        acfg = AugmentConfig(**{**augment_cfg, "preset": preset})
        self.preset, self.size = EvalPreset(acfg, size), size
        torch.set_num_threads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.transforms import decode_tensor

        n = len(batch["source"])
        out = np.zeros((n, 3, self.size, self.size), dtype=np.uint8)
        errors = list(batch["error"])
        for i in range(n):
            if errors[i]:
                continue
            try:
                out[i] = self.preset(decode_tensor(bytes(batch["bytes"][i]))).numpy()
            except images.ImageError as e:
                errors[i] = f"{e.reason}: {e}"
        rest = {k: v for k, v in batch.items() if k not in ("bytes", "error")}
        return {**rest, "image": out, "error": np.array(errors, dtype=object)}


class ModelBatch:
    """Ray Data actor holding the model: uint8 images -> label, score, top-k."""

    def __init__(self, model_uri: str, model_name: str, run_id: str, topk: int, batch_size: int,
                 compile_model: bool, threads: int, opts: storage.StorageOptions,
                 decode: dict[str, Any] | None = None) -> None:
        import torch

        from pipeline.models import zoo as models
        from pipeline.transforms import EvalPreset

        storage.configure(opts)
        # decode: {"augment_cfg", "size", "preset"} -> this actor decodes the bytes itself
        # (predict.gpu_decode): JPEGs in batches on the model's device, so a GPU is not
        # starved by CPU decoding; the CPU decode actors are skipped.
        self.decode = decode
        if decode is not None:
            self.size = decode["size"]
            self.preset = EvalPreset(AugmentConfig(**{**decode["augment_cfg"], "preset": decode["preset"]}),
                                     decode["size"])
        art = artifact.load(model_uri)
        meta = art.meta
        self.classes = list(meta["classes"])
        self.mean, self.std = meta["mean"], meta["std"]
        self.model_name, self.run_id = model_name, run_id
        self.topk = min(topk, len(self.classes))
        self.batch_size = batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(max(1, threads))
        model = models.build_model(meta["arch"], len(self.classes))
        model.load_state_dict(art.state_dict)
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            if compile_model:
                model = torch.compile(model)
        self.model = model

    def _decode_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bytes -> eval-transformed uint8 images, decoding JPEGs in one call on the device."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        from pipeline.transforms import decode_tensor

        n = len(batch["source"])
        errors = list(batch["error"])
        out = torch.zeros((n, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        jpeg = [i for i in range(n) if not errors[i] and bytes(batch["bytes"][i][:2]) == b"\xff\xd8"]
        decoded: dict[int, torch.Tensor] = {}
        if jpeg:
            data = [torch.frombuffer(bytearray(batch["bytes"][i]), dtype=torch.uint8) for i in jpeg]
            try:
                imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
                decoded.update(zip(jpeg, imgs))
            except RuntimeError:  # one bad JPEG fails the batch call: decode one by one below
                pass
        for i in range(n):
            if errors[i]:
                continue
            try:
                img = decoded.get(i)
                if img is None:  # PNG & co., or a JPEG the batch decoder refused: safe CPU path
                    img = decode_tensor(bytes(batch["bytes"][i])).to(self.device)
                out[i] = self.preset(img)
            except images.ImageError as e:
                errors[i] = f"{e.reason}: {e}"
        return {**batch, "image": out, "error": np.array(errors, dtype=object)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from pipeline.transforms import to_input

        if self.decode is not None:
            batch = self._decode_batch(batch)
        n = len(batch["source"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        labels = np.full(n, -1, dtype=np.int32)
        scores = np.zeros(n, dtype=np.float32)
        top_l = np.zeros((n, self.topk), dtype=np.int32)
        top_s = np.zeros((n, self.topk), dtype=np.float32)
        idx = np.flatnonzero(ok)
        for start in range(0, len(idx), self.batch_size):
            sel = idx[start:start + self.batch_size]
            images_u8 = batch["image"][sel] if torch.is_tensor(batch["image"]) else torch.from_numpy(batch["image"][sel])
            x = to_input(images_u8, self.mean, self.std, self.device, channels_last=self.device.type == "cuda")
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                        enabled=self.device.type == "cuda"):
                probs = torch.softmax(self.model(x).float(), dim=1)
            s, lab = probs.topk(self.topk, dim=1)
            top_l[sel], top_s[sel] = lab.cpu().numpy(), s.cpu().numpy()
            labels[sel], scores[sel] = top_l[sel, 0], top_s[sel, 0]
        return {"image_id": batch["image_id"], "source": batch["source"], "label": labels,
                "label_name": np.array([self.classes[i] if i >= 0 else "" for i in labels], dtype=object),
                "score": scores, "topk_labels": list(top_l), "topk_scores": list(top_s),
                "model": np.array([self.model_name] * n, dtype=object),
                "run_id": np.array([self.run_id] * n, dtype=object), "error": batch["error"],
                "truth": batch["truth"]}


# ------------------------------------------------------------------ read / write


def _read_batch(batch: dict[str, np.ndarray], opts: storage.StorageOptions) -> dict[str, np.ndarray]:
    """Ray Data task: fetch the batch's objects concurrently (:func:`storage.read_many`),
    hash them. An object gone since the listing is an error row; 403 or a fault that
    outlasts the retries fails the task."""
    storage.configure(opts)
    uris = [str(u) for u in batch["uri"]]
    blobs: list[bytes | str] = []
    for got in storage.read_many(uris, opts):
        if isinstance(got, storage.NotFound):
            blobs.append("missing: object disappeared after listing")
        elif isinstance(got, Exception):
            raise got
        else:
            blobs.append(got)
    data = [b if isinstance(b, bytes) else b"" for b in blobs]
    errors = [b if isinstance(b, str) else ("empty: zero-byte file" if not b else "") for b in blobs]
    return {"source": np.array(uris, dtype=object), "bytes": np.array(data, dtype=object),
            "image_id": np.array([hashlib.sha256(b).hexdigest() if b else "" for b in data], dtype=object),
            "error": np.array(errors, dtype=object), "truth": batch["truth"]}


def _shard_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Manifest input: shard rows already hold bytes and ids."""
    n = len(batch["source"])
    return {"source": batch["source"], "bytes": batch["image"], "image_id": batch["image_id"],
            "error": np.array([""] * n, dtype=object), "truth": batch["label"].astype(np.int32)}


def _write_part(batch: dict[str, Any], dst: str, model_name: str, opts: storage.StorageOptions) -> dict[str, Any]:
    """Ray Data task: write one predictions file (+ its errors file); name from content."""
    storage.configure(opts)
    sources = [str(s) for s in batch["source"]]
    digest = hashlib.sha1(("\n".join(sorted(sources)) + "|" + model_name).encode()).hexdigest()[:20]
    name = f"part-{digest}.parquet"
    errors = np.array([bool(e) for e in batch["error"]], dtype=bool)
    good = ~errors
    n_bad = int(errors.sum())
    correct = int(np.sum((np.asarray(batch["label"]) == np.asarray(batch["truth"]))[good]))
    labelled = int(np.sum(np.asarray(batch["truth"])[good] >= 0))
    if n_bad:
        bad = pa.table({"source": [s for s, e in zip(sources, errors) if e],
                        "image_id": [str(i) for i, e in zip(batch["image_id"], errors) if e],
                        "error": [str(x) for x, e in zip(batch["error"], errors) if e]}, schema=ERROR_SCHEMA)
        _write_table(storage.join(dst, "_errors", name), bad)
    if good.any():
        table = pa.table({
            "image_id": [str(x) for x in np.asarray(batch["image_id"])[good]],
            "source": [s for s, g in zip(sources, good) if g],
            "label": np.asarray(batch["label"], dtype=np.int32)[good],
            "label_name": [str(x) for x in np.asarray(batch["label_name"])[good]],
            "score": np.asarray(batch["score"], dtype=np.float32)[good],
            "topk_labels": [list(map(int, x)) for x, g in zip(batch["topk_labels"], good) if g],
            "topk_scores": [list(map(float, x)) for x, g in zip(batch["topk_scores"], good) if g],
            "model": [str(x) for x in np.asarray(batch["model"])[good]],
            "run_id": [str(x) for x in np.asarray(batch["run_id"])[good]],
        }, schema=PRED_SCHEMA)
        _write_table(storage.join(dst, name), table)
    return {"file": [name if good.any() else ""], "error_file": [name if n_bad else ""],
            "rows": [int(good.sum())], "errors": [n_bad], "correct": [correct], "labelled": [labelled]}


def _write_table(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


# ----------------------------------------------------------------------- listing


# -------------------------------------------------------------------------- run


def _existing(dst: str, model_name: str) -> tuple[dict[str, Any] | None, dict[str, str], set[str]]:
    """(committed _SUCCESS, {part file -> model} for all part files, sources by this model)."""
    success = None
    if storage.exists(storage.join(dst, SUCCESS)):
        success = storage.read_json(storage.join(dst, SUCCESS))
    files: dict[str, str] = {}
    done: set[str] = set()
    for sub in ("", "_errors"):
        for name in storage.listdir(storage.join(dst, sub) if sub else dst):
            if not (name.startswith("part-") and name.endswith(".parquet")):
                continue
            uri = storage.join(dst, sub, name) if sub else storage.join(dst, name)
            cols = ["source", "model"] if not sub else ["source"]
            t = _read_table(uri, cols)
            model = t.column("model")[0].as_py() if (not sub and t.num_rows) else model_name
            files[f"{sub}/{name}" if sub else name] = model
            if model == model_name:
                done.update(t.column("source").to_pylist())
    return success, files, done


def run(model_ref: str, src: str, dst: str, cfg: Config, quiet: bool = False) -> dict[str, Any]:
    """``imgpipe predict``: score every image of ``src`` into ``dst``."""
    import ray
    import ray.data

    from pipeline.ops.runtime import READ_TASK_CPUS, ensure_ray, predict_resources

    t0 = time.time()
    art = resolve(model_ref, cfg)  # fail at start (exit 2) if the model is unusable
    name = model_id(art.meta, art.uri)
    dst = storage.normalize(dst)
    state_uri = storage.join(dst, STATE)
    attempt_uri = storage.join(state_uri, "attempt.json")
    attempt = storage.read_json(attempt_uri) if storage.exists(attempt_uri) else None
    resuming = bool(attempt and not attempt.get("committed") and attempt.get("model") == name
                    and attempt.get("input") == src)
    listing, manifest, split = (None, None, None)
    if resuming and attempt.get("listing") and storage.exists(storage.join(state_uri, "listing.parquet")):
        listing = _read_table(storage.join(state_uri, "listing.parquet"))
        log.info("predict: resuming run %s (reusing its listing of %d images)", attempt["run_id"], listing.num_rows)
    else:
        listing, manifest, split = listings.read_input(src)
    if manifest is not None and list(manifest.classes) != art.classes:
        raise UserError(f"model {name} classes {art.classes} do not match dataset classes {manifest.classes}")
    run_id = attempt["run_id"] if resuming else uuid.uuid4().hex[:12]
    if not resuming:
        if manifest is None:
            _write_table(storage.join(state_uri, "listing.parquet"), listing)
        storage.write_json(attempt_uri, {"run_id": run_id, "model": name, "input": src, "committed": False,
                                         "listing": manifest is None, "started": time.time()})

    success, files, done_same_model = _existing(dst, name)
    committed_files = set(success.get("files", []) + success.get("error_files", [])) if success else set()
    pending_same = set()
    skip: set[str] = set()
    if resuming:
        for f, m in files.items():
            if f not in committed_files and m == name:
                pending_same.add(f)
        for f in pending_same:
            uri = storage.join(dst, f)
            skip.update(_read_table(uri, ["source"]).column("source").to_pylist())
    if cfg.predict.skip_existing and success and success.get("model") == name and manifest is None:
        prev_uri = storage.join(state_uri, "committed_listing.parquet")
        if storage.exists(prev_uri):
            prev = _read_table(prev_uri)
            prev_version = dict(zip(prev.column("uri").to_pylist(), prev.column("version").to_pylist()))
            now_version = dict(zip(listing.column("uri").to_pylist(), listing.column("version").to_pylist()))
            skip.update(u for u, v in now_version.items() if prev_version.get(u) == v and u in done_same_model)

    ensure_ray(cfg, quiet=quiet)
    size = int(art.meta["image_size"])
    cpus = ray.cluster_resources().get("CPU", 1.0)
    preflight.check(preflight.predict_request(cfg, cpus, image_size=size), "predict", cfg)
    res = predict_resources(cfg, cpus)
    opts = storage.default_options()
    preset = art.meta.get("eval_preset", cfg.augment.preset)
    if manifest is not None:
        ds = stream.read_split(manifest, split, columns=["image_id", "image", "label", "source"])
        total = manifest.rows(split)
        ds = ds.map_batches(_shard_rows, num_cpus=READ_TASK_CPUS, batch_size=READ_BATCH)
        if skip:
            ds = ds.filter(lambda r: r["source"] not in skip)
    else:
        todo = listing.filter(pc.invert(pc.is_in(listing.column("uri"), value_set=pa.array(sorted(skip), pa.string())))) if skip else listing
        total = listing.num_rows
        todo = todo.append_column("truth", pa.array([-1] * todo.num_rows, pa.int32()))
        blocks = [todo.slice(i, READ_BATCH * 16) for i in range(0, todo.num_rows, READ_BATCH * 16)]
        if not blocks:
            ds = None
        else:
            ds = ray.data.from_arrow(blocks).map_batches(_read_batch, fn_kwargs={"opts": opts}, batch_size=READ_BATCH,
                                                          num_cpus=READ_TASK_CPUS)
    results: list[dict[str, Any]] = []
    scored = 0
    if ds is not None:
        decode = {"augment_cfg": _augment_dict(cfg), "size": size, "preset": preset}
        if not cfg.predict.gpu_decode:
            ds = ds.map_batches(DecodeBatch, fn_constructor_kwargs=decode,
                                compute=ray.data.ActorPoolStrategy(size=cfg.predict.decode_actors),
                                num_cpus=res.decode_cpus, batch_size=READ_BATCH)
        ds = ds.map_batches(ModelBatch, fn_constructor_kwargs={
            "model_uri": art.uri, "model_name": name, "run_id": run_id, "topk": cfg.predict.topk,
            "batch_size": cfg.predict.batch_size, "compile_model": cfg.predict.compile,
            "threads": res.model_threads, "opts": opts, "decode": decode if cfg.predict.gpu_decode else None},
            compute=ray.data.ActorPoolStrategy(size=cfg.predict.model_actors), num_cpus=res.model_cpus, num_gpus=cfg.predict.num_gpus,
            batch_size=cfg.predict.batch_size)
        ds = ds.map_batches(_write_part, fn_kwargs={"dst": dst, "model_name": name, "opts": opts},
                            batch_size=cfg.predict.rows_per_file, num_cpus=READ_TASK_CPUS)
        t_run = time.time()
        with Watchdog(f"predict into {dst}", storage.join(dst, STATE), cfg.ray.stall_timeout_s) as dog:
            for r in _rows(ds, dog):
                results.append(r)
                scored += r["rows"] + r["errors"]
                if not quiet:
                    rate = scored / max(time.time() - t_run, 1e-9)
                    left = total - len(skip) - scored
                    log.info("predict: %d/%d images, %.0f img/s, ETA %.0fs", scored + len(skip), total, rate,
                             left / max(rate, 1e-9))
    return _commit(dst, name, art, run_id, src, listing if manifest is None else None, results, files,
                   committed_files, pending_same, skip, success, cfg, t0, total, scored)


def _rows(ds, dog: Watchdog):
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


def _augment_dict(cfg: Config) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg.augment)


def _commit(dst, name, art, run_id, src, listing, results, files, committed_files, pending_same, skip,
            success, cfg: Config, t0: float, total: int, scored: int) -> dict[str, Any]:
    """Select the output files, enforce one row per source, write ``_SUCCESS`` last."""
    new_files = {r["file"] for r in results if r["file"]} | {f for f in pending_same if not f.startswith("_errors/")}
    new_errors = {f"_errors/{r['error_file']}" for r in results if r["error_file"]} | {
        f for f in pending_same if f.startswith("_errors/")}
    keep_old: set[str] = set()
    if skip and success:
        # incremental: keep committed files by this model; drop rows re-scored this run
        rescored: set[str] = set()
        for f in new_files | new_errors:
            rescored.update(_read_table(storage.join(dst, f), ["source"]).column("source").to_pylist())
        for f in success.get("files", []) + success.get("error_files", []):
            if f in new_files or f in new_errors or files.get(f) != name:
                continue
            uri = storage.join(dst, f)
            t = _read_table(uri)
            mask = pc.invert(pc.is_in(t.column("source"), value_set=pa.array(sorted(rescored), pa.string())))
            kept = t.filter(mask)
            if kept.num_rows != t.num_rows:
                _write_table(uri, kept)
            if kept.num_rows:
                keep_old.add(f)
    all_files = sorted(new_files | {f for f in keep_old if not f.startswith("_errors/")})
    all_errors = sorted(new_errors | {f for f in keep_old if f.startswith("_errors/")})
    rows = sum(pq.read_metadata(io.BytesIO(storage.read_bytes(storage.join(dst, f)))).num_rows for f in all_files)
    errors = sum(pq.read_metadata(io.BytesIO(storage.read_bytes(storage.join(dst, f)))).num_rows for f in all_errors)
    if total and errors / total > cfg.data.max_bad_fraction:
        raise JobFailed(f"{errors} of {total} images could not be decoded ({errors / total:.2%} > "
                        f"data.max_bad_fraction {cfg.data.max_bad_fraction:.2%}); see {dst}/_errors/ ; not committed")
    seconds = time.time() - t0
    labelled = sum(r["labelled"] for r in results)
    summary = {"rows": rows, "errors": errors, "files": all_files, "error_files": all_errors, "model": name,
               "model_uri": art.uri, "weights_sha256": art.meta.get("weights_sha256"), "run_id": run_id,
               "input": src, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(dst, SUCCESS), summary)  # the commit point
    if listing is not None:
        _write_table(storage.join(dst, STATE, "committed_listing.parquet"), listing)
    storage.write_json(storage.join(dst, STATE, "attempt.json"), {"run_id": run_id, "model": name, "input": src,
                                                                   "committed": True})
    listed = set(all_files) | set(all_errors)
    for f in files:  # files of older runs or other models that the commit did not select
        if f not in listed:
            storage.remove(storage.join(dst, f))
    out = {"predictions_uri": dst, "rows": rows, "errors": errors, "files": len(all_files),
           "scored": scored, "skipped": len(skip), "model": name, "run_id": run_id,
           "seconds": round(seconds, 3), "images_per_second": round(scored / max(seconds, 1e-9), 1)}
    if labelled:
        out["accuracy"] = round(sum(r["correct"] for r in results) / labelled, 6)
    from pipeline.report import report

    out["report"] = report.write_predict_report(dst)
    log.info("predict: %d rows, %d errors in %d files -> %s (%.1fs)", rows, errors, len(all_files), dst, seconds)
    return out


def read_predictions(dst: str) -> pa.Table:
    """The committed predictions of ``dst`` (only files listed in ``_SUCCESS``)."""
    try:
        success = storage.read_json(storage.join(dst, SUCCESS))
    except storage.NotFound:
        raise UserError(f"no committed predictions at {dst} (missing {SUCCESS})") from None
    tables = [_read_table(storage.join(dst, f)) for f in success["files"]]
    return pa.concat_tables(tables) if tables else PRED_SCHEMA.empty_table()
