"""Registering a trained model: ``imgpipe models register`` and ``imgpipe train --register``.

What this module owns:

- what MODEL may name: a checkpoint folder (``weights.pt`` + ``meta.json``) or a training
  run folder (``train.storage/<run>``), whose best checkpoint (highest
  ``metrics.val_accuracy`` among ``checkpoint_epoch_*``) is taken;
- the three ways a registered version may become the champion (:data:`MODES`):
  ``"gate"`` scores challenger and champion on the same holdout (the ``test`` split of
  ``--data``, else ``data.manifest``, else the dataset the model was trained on) and
  promotes through :func:`pipeline.registry.gate`; ``"promote"`` forces it; ``"none"``
  only registers;
- idempotence: registering the same checkpoint (same source URI and weights sha256)
  again returns the version it already is instead of adding a copy.

The copy itself (weights and meta with their sha256, provenance) is
:func:`pipeline.registry.register`.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from pipeline import names, registry, storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.inference import evaluate
from pipeline.models import artifact
from pipeline.training.state import CHECKPOINT_PREFIX, SCORE

Mode = Literal["gate", "promote", "none"]
MODES: tuple[str, ...] = ("gate", "promote", "none")
HOLDOUT_SPLIT = "test"  # the frozen holdout every gate scores on


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"register: {msg}", file=sys.stderr, flush=True)


def best_checkpoint(model: str) -> str:
    """``model`` itself when it is a checkpoint folder; a run folder's best checkpoint;
    else UserError saying what was looked for."""
    uri = storage.normalize(model)
    if storage.exists(storage.join(uri, names.META)):
        return uri
    scored = []
    for child in storage.listdir(uri):
        if not child.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            meta = artifact.read_meta(storage.join(uri, child))
        except artifact.ArtifactError:
            continue  # a checkpoint still being written
        scored.append((float((meta.get("metrics") or {}).get(SCORE, -1.0)), child))
    if not scored:
        raise UserError(f"{model} is neither a checkpoint folder (no {names.META}) nor a training run "
                        f"folder (no {CHECKPOINT_PREFIX}* checkpoints)")
    return storage.join(uri, max(scored)[1])


def _holdout(cfg: Config, data: str | None, meta: dict[str, Any]) -> str:
    holdout = data or cfg.data.manifest or meta.get("data_manifest")
    if not holdout:
        raise UserError("--gate needs a holdout: pass --data MANIFEST (its test split) or set data.manifest")
    return holdout


def _existing(cfg: Config, name: str, source: str, sha: str | None) -> dict[str, Any] | None:
    """The version already registered from this very checkpoint, if any."""
    try:
        listed = registry.list_versions(cfg.registry.uri, name)
    except UserError:  # no such model yet
        return None
    for v in listed["versions"]:
        meta = registry.show(cfg.registry.uri, f"{name}@v{v['version']}")
        if meta.get("source") == source and meta.get("weights_sha256") == sha:
            return meta
    return None


def register(cfg: Config, model: str, name: str, mode: Mode = "none", *, data: str | None = None,
             holdout_accuracy: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """Register ``model`` (checkpoint or run folder) as ``name``'s next version; then gate,
    promote or neither (``mode``). ``holdout_accuracy``: the challenger's score on the
    holdout when the caller already has it (``train --register``). Returns the summary."""
    if mode not in MODES:
        raise UserError(f"unknown registration mode {mode!r}; valid: {', '.join(MODES)}")
    source = best_checkpoint(model)
    meta = artifact.read_meta(source)
    holdout = _holdout(cfg, data, meta) if mode == "gate" else None
    version = _existing(cfg, name, source, meta.get("weights_sha256"))
    if version is not None and holdout_accuracy is None:
        holdout_accuracy = (version.get("metrics") or {}).get("holdout_accuracy")
    if holdout is not None and holdout_accuracy is None:
        _say(f"scoring {source} on the {HOLDOUT_SPLIT} split of {holdout}", quiet)
        holdout_accuracy = evaluate.run(source, holdout, HOLDOUT_SPLIT, cfg, quiet=quiet)["accuracy"]
    if version is not None:
        _say(f"{source} is already {version['ref']}; not registered again", quiet)
    else:
        metrics = {"best_val_accuracy": (meta.get("metrics") or {}).get(SCORE)}
        if holdout_accuracy is not None:
            metrics["holdout_accuracy"] = holdout_accuracy
        version = registry.register(cfg.registry.uri, name, source, metrics=metrics)
        _say(f"{source} registered as {version['ref']} in {cfg.registry.uri}", quiet)
    summary = {"ref": version["ref"], "name": name, "version": version["version"], "uri": version["uri"],
               "source": source, "weights_sha256": version.get("weights_sha256"), "registry": cfg.registry.uri,
               "mode": mode, "holdout": holdout, "holdout_accuracy": holdout_accuracy}
    return {**summary, **_decide(cfg, name, version["version"], mode, holdout, holdout_accuracy, quiet)}


def _decide(cfg: Config, name: str, version: int, mode: Mode, holdout: str | None,
            score: float | None, quiet: bool) -> dict[str, Any]:
    """Gate, force or leave the champion; ``{"promoted", "champion", "reason"}``."""
    if mode == "none":
        champ = registry.champion(cfg.registry.uri, name)
        return {"promoted": False, "champion": champ["version"] if champ else None,
                "reason": "registered only (neither --gate nor --promote)"}
    if mode == "promote":
        r = registry.promote(cfg.registry.uri, f"{name}@v{version}", reason="manual: --promote")
        _say(f"{name}@v{version} is the champion (forced by --promote)", quiet)
        return {"promoted": not r.get("unchanged", False), "champion": version, "reason": r["reason"]}
    assert holdout is not None and score is not None
    champ = registry.champion(cfg.registry.uri, name)
    champ_score = None
    if champ is not None and champ["version"] != version:
        _say(f"scoring the champion {champ['ref']} on the same holdout", quiet)
        champ_score = evaluate.run(champ["uri"], holdout, HOLDOUT_SPLIT, cfg, quiet=quiet)["accuracy"]
    decision = registry.gate(cfg.registry.uri, name, version, challenger_score=score,
                             champion_score=champ_score, min_improvement=cfg.registry.min_improvement)
    _say(decision["reason"], quiet)
    return {"promoted": decision["promoted"], "champion": decision["champion"], "reason": decision["reason"],
            "champion_holdout_accuracy": champ_score}
