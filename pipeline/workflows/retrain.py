"""Nightly retraining: ``imgpipe retrain CONFIG --date YYYY-MM-DD``.

For night D:

1. pack the labelled images that arrived under ``data.incoming/dt=D/`` (ImageFolder, or
   a labels file at its top: a Label Studio JSON export or a CSV ``uri,label``, e.g. the
   answers to an ``imgpipe review`` queue) with the base dataset's classes, all into ``train``;
2. write a new dataset version ``<base>/versions/dt=D/manifest.json``: the previous
   version's training shards plus the new ones; ``val`` and ``test`` stay the base
   dataset's (the holdout is frozen, so scores are comparable night after night);
3. fine-tune from the current champion (warm start; from scratch if there is none);
4. score challenger and champion on the same holdout, register the challenger, and
   promote it only through the gate (``registry.min_improvement``; ties keep the champion);
5. re-score the stored images (``predict.input`` -> ``predict.output``) with the
   champion, incrementally (``--skip-existing``).

Completeness: a night trains on ``dt=D`` only once its producer has written
``data.incoming/dt=D/_SUCCESS`` (:data:`pipeline.names.PARTITION_COMPLETE`; any content,
e.g. empty), saying that no more images will land there; an empty day needs the marker
too. Without it retrain exits 2 and records nothing, so the next attempt still trains.

``<base>/versions/dt=D/retrain.json`` (:data:`pipeline.names.RETRAIN_DONE`) is written
last, with the partition's listing (file count, bytes, and a sha256 of the sorted
``path size version`` lines: ETags on S3, mtimes locally). Rerunning a finished date
changes nothing and says so, unless the partition changed since it was trained on:
then it exits 2 naming the date and the change, instead of silently skipping the late
images. A crashed night resumes: its training run has a fixed name (Ray Train restores
it) and a version already registered from the same checkpoint is reused instead of
registered twice.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import logging
import sys
import time
from typing import Any

from pipeline import names, registry, storage
from pipeline.config import Config
from pipeline.data import packing, shardset
from pipeline.errors import UserError
from pipeline.inference import evaluate, predict
from pipeline.training import driver

log = logging.getLogger("imgpipe")


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"retrain: {msg}", file=sys.stderr, flush=True)


def _versions_root(base: shardset.Manifest) -> str:
    return storage.join(base.root, "versions")


def _previous_version(base: shardset.Manifest, date: str) -> shardset.Manifest:
    """The latest finished version before ``date``, else the base dataset."""
    root = _versions_root(base)
    done = [n for n in storage.listdir(root)
            if n.startswith("dt=") and n[3:] < date and storage.exists(storage.join(root, n, names.RETRAIN_DONE))]
    for name in sorted(done, reverse=True):
        if storage.exists(storage.join(root, name, names.MANIFEST)):
            return shardset.read_manifest(storage.join(root, name))
    return base


def _absolute(m: shardset.Manifest, split: str) -> list[dict[str, Any]]:
    return [{**s, "path": shardset.shard_uri(m.root, s["path"])} for s in m.splits.get(split, [])]


def _check_inputs(cfg: Config, date: str) -> None:
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise UserError(f"--date must be YYYY-MM-DD, got {date!r}") from None
    if not cfg.data.manifest:
        raise UserError("data.manifest (the base dataset, whose test split is the frozen holdout) is not set")
    if not cfg.data.incoming:
        raise UserError("data.incoming (prefix holding dt=YYYY-MM-DD/<class>/<image> folders) is not set")


@dataclasses.dataclass(frozen=True)
class Partition:
    """What ``data.incoming/dt=D/`` held when it was trained on (recorded in retrain.json)."""

    files: int
    bytes: int
    listing_sha256: str  # of the sorted "relative-path size version" lines

    def change_from(self, before: Partition) -> str | None:
        """How this listing differs from ``before``, in words; None when it does not."""
        if self == before:
            return None
        verb = "grew" if self.files > before.files else "changed"
        return (f"{verb} after it was trained on: {before.files} -> {self.files} files, "
                f"{before.bytes} -> {self.bytes} bytes")


def partition_state(incoming: str) -> Partition:
    """List ``incoming`` (images and any other files; markers and ``_``/``.`` names skipped)."""
    lines, total = [], 0
    for f in storage.iter_files(incoming):
        rel = f.uri[len(storage.normalize(incoming)):].lstrip("/")
        lines.append(f"{rel} {f.size} {f.version}\n")
        total += f.size
    digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
    return Partition(files=len(lines), bytes=total, listing_sha256=digest)


def _require_complete(incoming: str, date: str) -> Partition:
    """The partition's listing, once its producer has marked it complete; else UserError."""
    marker = storage.join(incoming, names.PARTITION_COMPLETE)
    if not storage.exists(marker):
        raise UserError(f"dt={date} is not marked complete: no {marker}. Producers write "
                        f"{names.PARTITION_COMPLETE} once the day's images have all landed (an empty "
                        "day needs it too); retrain waits for it and has recorded nothing")
    return partition_state(incoming)


def _already_done(done_uri: str, incoming: str, date: str, quiet: bool) -> dict[str, Any]:
    """The finished night's summary; UserError when its partition changed since."""
    previous = storage.read_json(done_uri)
    recorded = previous.get("partition")
    if recorded is not None and storage.exists(incoming):  # a deleted (expired) partition is no change
        change = partition_state(incoming).change_from(Partition(**recorded))
        if change is not None:
            raise UserError(f"dt={date} {change} (recorded in {done_uri}); the late images would "
                            "never be trained on. Move them to a partition not yet trained on (e.g. "
                            f"today's), or restore dt={date} to what was trained")
    _say(f"{date} already done ({previous.get('outcome')}); nothing changed", quiet)
    return {**previous, "already_done": True, "message": f"retrain for {date} already ran; nothing changed"}


def run(cfg: Config, date: str, quiet: bool = False) -> dict[str, Any]:
    """Retrain for night ``date`` (steps 1-5 above); returns the night's summary."""
    t0 = time.time()
    _check_inputs(cfg, date)
    base = shardset.read_manifest(cfg.data.manifest)
    version_root = storage.join(_versions_root(base), f"dt={date}")
    done_uri = storage.join(version_root, names.RETRAIN_DONE)
    incoming = storage.join(cfg.data.incoming, f"dt={date}")
    if storage.exists(done_uri):
        return _already_done(done_uri, incoming, date, quiet)

    partition = _require_complete(incoming, date)
    if partition.files == 0:
        summary = {"date": date, "outcome": "no new data", "new_images": 0, "incoming": incoming}
        _say(f"no new images at {incoming}; nothing to train", quiet)
    else:
        summary = _retrain(cfg, base, date, incoming, version_root, quiet)
    summary["partition"] = dataclasses.asdict(partition)
    storage.write_json(done_uri, summary)  # last: the night is done
    return {**summary, "already_done": False, "seconds": round(time.time() - t0, 1)}


def labels_file(incoming: str) -> str | None:
    """The labels file at the top of partition ``incoming`` (``*.json`` Label Studio export or
    ``*.csv`` ``uri,label``), None for an ImageFolder partition; UserError for two."""
    top = [f.uri for f in storage.iter_files(incoming, (".json", ".csv"))
           if "/" not in f.uri[len(storage.normalize(incoming).rstrip("/")) + 1:]]
    if len(top) > 1:
        raise UserError(f"{incoming} holds {len(top)} labels files ({', '.join(top)}); a night takes one")
    return top[0] if top else None


def _new_version(cfg: Config, base: shardset.Manifest, date: str, incoming: str, version_root: str,
                 quiet: bool) -> tuple[shardset.Manifest, int]:
    """Steps 1-2: pack the night's images, write the dataset version; (version, new images)."""
    _say(f"packing new images from {incoming}", quiet)
    pack_cfg = copy.deepcopy(cfg)
    pack_cfg.data.val_fraction = pack_cfg.data.test_fraction = 0.0  # all new images train
    new = storage.join(version_root, "incoming")
    source = labels_file(incoming) or incoming
    packed = packing.pack(source, new, pack_cfg, seed=cfg.train.seed, quiet=quiet, classes=base.classes)
    prev = _previous_version(base, date)
    manifest = {
        "format": 1, "classes": base.classes,
        "splits": {"train": _absolute(prev, "train") + _absolute(shardset.read_manifest(new), "train"),
                   "val": _absolute(base, "val"), "test": _absolute(base, "test")},
        "source": incoming, "parent": prev.root, "date": date,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(storage.join(version_root, names.MANIFEST), manifest)
    return shardset.read_manifest(version_root), packed["images"]


def _retrain(cfg: Config, base: shardset.Manifest, date: str, incoming: str, version_root: str,
             quiet: bool) -> dict[str, Any]:
    """Steps 1-5 for a night with new images; returns its summary."""
    version, new_images = _new_version(cfg, base, date, incoming, version_root, quiet)
    name = cfg.registry.name

    # 3. warm start from the champion
    champ = registry.champion(cfg.registry.uri, name)
    tcfg = copy.deepcopy(cfg)
    tcfg.data.manifest = version_root
    tcfg.train.run_name = f"{name}-retrain-{date}"
    if champ is not None:
        tcfg.model.pretrained = f"{name}@v{champ['version']}"
        tcfg.model.arch = champ["arch"]
    if champ is not None:
        start = f"warm start from the champion {tcfg.model.pretrained}"
    elif tcfg.model.pretrained:
        start = f"no champion yet: warm start from model.pretrained {tcfg.model.pretrained}"
    else:
        start = "no champion yet: from scratch (random initialisation)"
    _say(f"training on {version.rows('train')} images ({new_images} new), {start}", quiet)
    trained = driver.run(tcfg, quiet=quiet)

    # 4. same holdout for both, then the gate
    challenger_score = trained["test_accuracy"]
    champion_score = None
    if champ is not None:
        champion_score = evaluate.run(f"{name}@v{champ['version']}", version_root, "test", tcfg,
                                      quiet=quiet)["accuracy"]
    reg = _register_once(cfg, trained, version, champ, challenger_score)
    decision = registry.gate(cfg.registry.uri, name, reg["version"], challenger_score=challenger_score,
                             champion_score=champion_score, min_improvement=cfg.registry.min_improvement)
    _say(decision["reason"], quiet)

    return {
        "date": date, "outcome": "promoted" if decision["promoted"] else "champion kept",
        "reason": decision["reason"], "promoted": decision["promoted"],
        "challenger": reg["ref"], "champion": f"{name}@v{decision['champion']}",
        "challenger_holdout_accuracy": challenger_score, "champion_holdout_accuracy": champion_score,
        "warm_start": tcfg.model.pretrained, "new_images": new_images,
        "train_images": version.rows("train"), "holdout_images": version.rows("test"),
        "dataset_version": version_root, "data_manifest_sha256": version.sha256,
        "run_uri": trained["run_uri"], "rescored": _rescore(cfg, quiet),
    }


def _rescore(cfg: Config, quiet: bool) -> dict[str, Any] | None:
    """Step 5: re-score the stored images with the (possibly new) champion, incrementally."""
    if not (cfg.predict.input and cfg.predict.output):
        return None
    pcfg = copy.deepcopy(cfg)
    pcfg.predict.skip_existing = True
    return predict.run(f"{cfg.registry.name}@champion", cfg.predict.input, cfg.predict.output, pcfg,
                       quiet=quiet)


def _register_once(cfg: Config, trained: dict[str, Any], version: shardset.Manifest,
                   champ: dict[str, Any] | None, score: float) -> dict[str, Any]:
    """Register the run's best checkpoint, unless a crashed earlier attempt already did."""
    name = cfg.registry.name
    try:
        listed = registry.list_versions(cfg.registry.uri, name)
    except UserError:  # no such model yet
        listed = {"versions": []}
    for v in listed.get("versions", []):
        meta = registry.show(cfg.registry.uri, f"{name}@v{v['version']}")
        if meta.get("source") == trained["best_checkpoint_uri"]:
            return meta
    return registry.register(
        cfg.registry.uri, name, trained["best_checkpoint_uri"],
        metrics={"holdout_accuracy": score, "best_val_accuracy": trained["best_val_accuracy"]},
        data_manifest_sha256=version.sha256,
        parent=f"{name}@v{champ['version']}" if champ is not None else None)
