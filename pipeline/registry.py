"""The model registry: named, numbered, verified model versions on any storage URI.

What this module owns:

- the layout ``REGISTRY/NAME/vN/`` (an artifact folder, see :mod:`pipeline.models.artifact`:
  ``weights.pt`` + ``meta.json``) and ``REGISTRY/NAME/aliases.json``;
- registering a trained artifact as the next version (``v1`` first), with its
  provenance in ``meta.json``: ``name``, ``version``, ``metrics``, ``config``,
  ``data_manifest_sha256``, ``parent`` (``"NAME@vN"`` or null), ``source``;
- references: ``NAME@champion``, ``NAME@vN``, ``NAME@N``, bare ``NAME`` (= champion),
  and what ``--model`` accepts (:func:`resolve_model`);
- the champion alias, its history (for :func:`rollback`) and the promotion gate
  (:func:`gate`), which records its decision in the challenger's ``meta.json``.

``aliases.json`` is ``{"champion": int|null, "history": [int...], "updated": ISO time,
"reason": str}``; it and every ``meta.json`` are replaced atomically
(:func:`pipeline.storage.write_json`), so readers see the old or the new file, never a
torn one. A version whose weights sha256 disagrees with its meta is never promoted, and
:func:`pipeline.models.artifact.load` refuses to load it.

Concurrency: version allocation is list-then-write, last writer wins. S3 has no
conditional PUT here, so two processes registering the same NAME at the same moment can
pick the same ``vN``; :func:`register` re-reads ``meta.json`` after writing it and fails
(JobFailed) when another writer's meta replaced its own, and a version whose weights and
meta come from different writers is refused by its sha256 check. Alias updates are
read-modify-write with the same caveat. Run one registering/promoting process per model
name at a time (e.g. the nightly CronJob with ``concurrencyPolicy: Forbid``).

All storage access goes through :mod:`pipeline.storage`; every function returns a
JSON-able dict (or a URI string).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from pipeline import names, storage
from pipeline.errors import JobFailed, UserError
from pipeline.models import artifact

CHAMPION = "champion"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_VERSION_DIR_RE = re.compile(r"^v(\d+)$")
_TAG_RE = re.compile(r"^v?(\d+)$")
_REF_FORMS = "NAME@champion, NAME@vN, NAME@N or NAME"
# Keys of a version's meta that describe its place in a registry, not the model itself:
# dropped when registering from another registry's version folder.
_REGISTRY_KEYS = ("name", "version", "gate", "ref", "uri", "aliases", "registration_id")
_EPS = 1e-12  # float slack for "challenger >= champion + min_improvement"


# ---------------------------------------------------------------------- helpers


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise UserError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def _model_uri(registry: str, name: str) -> str:
    return storage.join(registry, _check_name(name))


def _version_uri(registry: str, name: str, version: int) -> str:
    return storage.join(_model_uri(registry, name), f"v{version}")


def _ref(name: str, version: int) -> str:
    return f"{name}@v{version}"


def _fmt(x: float) -> str:
    """3 decimals when that is exact, else enough digits not to hide a difference."""
    return f"{x:.3f}" if round(x, 3) == x else f"{x:.6g}"


def _version_dirs(registry: str, name: str) -> list[int]:
    """Every ``vN`` folder of NAME, complete or not, ascending."""
    found = (_VERSION_DIR_RE.match(n) for n in storage.listdir(_model_uri(registry, name)))
    return sorted(int(m.group(1)) for m in found if m)


def _model_names(registry: str) -> list[str]:
    """Folders of the registry root that hold versions or an alias file."""
    names = [n for n in storage.listdir(registry) if _NAME_RE.match(n) and n not in (".", "..")]
    return [n for n in names if _is_model(registry, n)]


def _is_model(registry: str, name: str) -> bool:
    children = storage.listdir(storage.join(registry, name))
    return names.ALIASES in children or any(_VERSION_DIR_RE.match(c) for c in children)


def _read_aliases(registry: str, name: str) -> dict[str, Any]:
    uri = storage.join(_model_uri(registry, name), names.ALIASES)
    try:
        data = storage.read_json(uri)
    except storage.NotFound:
        return {CHAMPION: None, "history": []}
    except ValueError as e:
        raise UserError(f"unreadable {uri}: {e}") from None
    data.setdefault(CHAMPION, None)
    data.setdefault("history", [])
    return data


def _write_aliases(registry: str, name: str, aliases: dict[str, Any]) -> None:
    aliases = {**aliases, "updated": _now()}
    storage.write_json(storage.join(_model_uri(registry, name), names.ALIASES), aliases)


def _read_version_meta(registry: str, name: str, version: int) -> dict[str, Any]:
    return artifact.read_meta(_version_uri(registry, name, version))


def _existing_summary(registry: str, name: str) -> str:
    """'versions: v1, v2; aliases: champion=v2' for error messages."""
    versions = _version_dirs(registry, name)
    champ = _read_aliases(registry, name)[CHAMPION]
    listed = ", ".join(f"v{v}" for v in versions) or "none"
    alias = f"champion=v{champ}" if champ is not None else "champion unset"
    return f"versions: {listed}; aliases: {alias}"


def _missing_model(registry: str, name: str) -> UserError:
    models = ", ".join(_model_names(registry)) or "none (empty registry)"
    return UserError(f"no model '{name}' in registry {registry}; models: {models}")


# ------------------------------------------------------------------- references


def _parse_ref(ref: str) -> tuple[str, int | None]:
    """``(name, version)``; version None means the champion."""
    name, sep, tag = ref.partition("@")
    if not _NAME_RE.match(name) or name in (".", "..") or (sep and not tag):
        raise UserError(f"bad model reference '{ref}': valid forms {_REF_FORMS}")
    if not sep or tag == CHAMPION:
        return name, None
    m = _TAG_RE.match(tag)
    if not m:
        raise UserError(f"bad model reference '{ref}': unknown tag '{tag}'; valid: champion, vN, N")
    return name, int(m.group(1))


def _resolve_version(registry: str, ref: str) -> tuple[str, int]:
    name, version = _parse_ref(ref)
    if not _is_model(registry, name):
        raise _missing_model(registry, name)
    if version is None:
        version = _read_aliases(registry, name)[CHAMPION]
        if version is None:
            raise UserError(f"model reference '{ref}': {name} has no champion in {registry} "
                            f"({_existing_summary(registry, name)}); promote one with "
                            f"'imgpipe models promote {name}@vN'")
    if not storage.exists(storage.join(_version_uri(registry, name, version), names.META)):
        raise UserError(f"model reference '{ref}': no version v{version} of {name} in {registry} "
                        f"({_existing_summary(registry, name)})")
    return name, version


def resolve(registry_uri: str, ref: str) -> str:
    """URI of the version folder that ``ref`` names; UserError listing what exists if none."""
    registry = storage.normalize(registry_uri)
    name, version = _resolve_version(registry, ref)
    return _version_uri(registry, name, version)


def resolve_model(ref: str, registry_uri: str) -> str:
    """What ``--model MODEL`` accepts: an artifact folder URI, else a registry reference."""
    if storage.exists(storage.join(ref, names.META)):
        return storage.normalize(ref)
    if "/" in ref or "://" in ref:
        raise UserError(_not_found_message(ref, registry_uri))
    registry = storage.normalize(registry_uri)
    name, _ = _parse_ref(ref)
    if "@" not in ref and not _is_model(registry, name):
        models = ", ".join(_model_names(registry)) or "none"
        raise UserError(f"{_not_found_message(ref, registry_uri)}; models in registry: {models}")
    return resolve(registry, ref)


def _not_found_message(ref: str, registry_uri: str) -> str:
    return (f"model not found: {ref} (not a registry reference NAME@champion/NAME@vN "
            f"in {registry_uri}, nor a checkpoint folder)")


# ------------------------------------------------------------------- registering


def register(registry_uri: str, name: str, artifact_uri: str, *, metrics: dict,
             config: dict | None = None, data_manifest_sha256: str | None = None,
             parent: str | None = None) -> dict:
    """Copy the (verified) artifact at ``artifact_uri`` into ``NAME/vN``; does not promote.

    ``config``, ``data_manifest_sha256`` and ``parent`` fall back to the artifact's own
    meta when not given. Returns the new version's meta plus ``ref`` and ``uri``.
    """
    registry = storage.normalize(registry_uri)
    _check_name(name)
    source = storage.normalize(artifact_uri)
    data, src_meta = _read_verified(source)
    version = (max(_version_dirs(registry, name), default=0)) + 1
    meta = _version_meta(src_meta, name, version, data, source, metrics=metrics, config=config,
                         data_manifest_sha256=data_manifest_sha256, parent=parent)
    uri = _version_uri(registry, name, version)
    storage.write_bytes(storage.join(uri, names.WEIGHTS), data)
    storage.write_json(storage.join(uri, names.META), meta)  # last: commits the version
    if artifact.read_meta(uri).get("registration_id") != meta["registration_id"]:
        raise JobFailed(f"concurrent registration of {_ref(name, version)} in {registry}: "
                        "another writer replaced this version; register again")
    return {**meta, "ref": _ref(name, version), "uri": uri}


def _read_verified(source: str) -> tuple[bytes, dict[str, Any]]:
    """Raw weights bytes and meta of an artifact, after :func:`artifact.load` verified it."""
    art = artifact.load(source)  # sha256 check + weights_only load
    data = storage.read_bytes(storage.join(source, names.WEIGHTS))
    expected = art.meta.get("weights_sha256")
    if expected and artifact.sha256(data) != expected:
        raise artifact.ArtifactError(f"weights of {source} changed while registering it; retry")
    return data, art.meta


def _version_meta(src_meta: dict[str, Any], name: str, version: int, data: bytes, source: str,
                  **provenance: Any) -> dict[str, Any]:
    meta = {k: v for k, v in src_meta.items() if k not in _REGISTRY_KEYS}
    for key, value in provenance.items():
        meta[key] = value if value is not None else src_meta.get(key)
    if "created" in src_meta:
        meta["source_created"] = src_meta["created"]
    meta.update(name=name, version=version, source=source, created=_now(),
                weights_sha256=artifact.sha256(data), registration_id=uuid.uuid4().hex)
    meta = storage.redact(meta)  # no user:password@ of a URI in the registry
    return meta


# ------------------------------------------------------------------ champion


def champion(registry_uri: str, name: str) -> dict | None:
    """Meta of NAME's champion (with ``ref`` and ``uri``), or None if it has none."""
    registry = storage.normalize(registry_uri)
    version = _read_aliases(registry, _check_name(name))[CHAMPION]
    if version is None:
        return None
    return {**_read_version_meta(registry, name, version), "ref": _ref(name, version),
            "uri": _version_uri(registry, name, version)}


def _verify_weights(registry: str, name: str, version: int) -> None:
    """Refuse a version whose weights bytes do not hash to its meta's sha256."""
    uri = _version_uri(registry, name, version)
    meta = artifact.read_meta(uri)
    try:
        digest = artifact.sha256(storage.read_bytes(storage.join(uri, names.WEIGHTS)))
    except storage.NotFound:
        raise artifact.ArtifactError(f"{_ref(name, version)} has no {names.WEIGHTS} at {uri}") from None
    if digest != meta.get("weights_sha256"):
        raise artifact.ArtifactError(
            f"refusing {_ref(name, version)}: weights sha256 {digest[:12]}... does not match "
            f"meta {str(meta.get('weights_sha256'))[:12]}... at {uri}")


def promote(registry_uri: str, ref: str, *, reason: str = "manual") -> dict:
    """Make the version ``ref`` names the champion; the previous one goes onto history."""
    registry = storage.normalize(registry_uri)
    name, version = _resolve_version(registry, ref)
    _verify_weights(registry, name, version)
    aliases = _read_aliases(registry, name)
    previous = aliases[CHAMPION]
    result = {"name": name, "champion": version, "previous": previous, "reason": reason}
    if previous == version:
        return {**result, "unchanged": True}
    history = list(aliases["history"]) + ([previous] if previous is not None else [])
    _write_aliases(registry, name, {**aliases, CHAMPION: version, "history": history,
                                    "reason": reason})
    return result


def rollback(registry_uri: str, name: str) -> dict:
    """Restore the previous champion from history; UserError if there is none."""
    registry = storage.normalize(registry_uri)
    if not _is_model(registry, _check_name(name)):
        raise _missing_model(registry, name)
    aliases = _read_aliases(registry, name)
    history = list(aliases["history"])
    if not history:
        raise UserError(f"cannot roll back {name} in {registry}: no previous champion in its "
                        f"history ({_existing_summary(registry, name)})")
    restored = history.pop()
    _verify_weights(registry, name, restored)
    current = aliases[CHAMPION]
    reason = f"rollback from v{current}" if current is not None else "rollback"
    _write_aliases(registry, name, {**aliases, CHAMPION: restored, "history": history,
                                    "reason": reason})
    return {"name": name, "champion": restored, "previous": current, "reason": reason}


# ---------------------------------------------------------------------- gate


def gate(registry_uri: str, name: str, version: int, *, challenger_score: float,
         champion_score: float | None, min_improvement: float = 0.0,
         metric: str = "holdout_accuracy") -> dict:
    """Promote ``version`` iff there is no champion, or it beats the champion's score by
    ``min_improvement`` and strictly (ties keep the champion). The decision is recorded
    as ``"gate"`` in the version's ``meta.json``.

    If a champion exists and ``champion_score`` is None, the champion's stored
    ``metrics[metric]`` is used; without one the gate refuses to decide (UserError).
    """
    registry = storage.normalize(registry_uri)
    name, version = _resolve_version(registry, _ref(_check_name(name), int(version)))
    current = _read_aliases(registry, name)[CHAMPION]
    if current not in (None, version) and champion_score is None:
        champion_score = _stored_score(registry, name, current, metric)
    promoted, why = _decide(version, current, challenger_score, champion_score, min_improvement)
    if promoted:
        promote(registry, _ref(name, version), reason=f"gate: {why}")
    decision = {"promoted": promoted, "reason": why, "metric": metric,
                "challenger_score": challenger_score, "champion_score": champion_score,
                "champion_version": current, "min_improvement": min_improvement,
                "decided": _now()}
    _record_gate(registry, name, version, decision)
    return {"promoted": promoted, "reason": why, "champion": version if promoted else current,
            "challenger": version, "name": name, "metric": metric,
            "challenger_score": challenger_score, "champion_score": champion_score,
            "min_improvement": min_improvement}


def _stored_score(registry: str, name: str, version: int, metric: str) -> float:
    score = (_read_version_meta(registry, name, version).get("metrics") or {}).get(metric)
    if score is None:
        raise UserError(f"gate for {name}: no champion_score given and champion v{version} "
                        f"has no metrics['{metric}'] recorded")
    return float(score)


def _decide(version: int, current: int | None, challenger: float, champ: float | None,
            min_improvement: float) -> tuple[bool, str]:
    """The gate rule alone: ``(promote?, human reason)``."""
    if current is None:
        return True, f"no champion yet: challenger v{version} ({_fmt(challenger)}) promoted"
    if current == version:
        return False, f"v{version} is already the champion: nothing to do"
    assert champ is not None
    lhs = f"challenger {_fmt(challenger)}"
    rhs = f"champion {_fmt(champ)} + min_improvement {min_improvement:.3f}"
    if challenger <= champ:
        return False, f"{lhs} <= {rhs}: champion kept"
    if challenger < champ + min_improvement - _EPS:
        return False, f"{lhs} < {rhs}: champion kept"
    return True, f"{lhs} >= {rhs}: challenger v{version} promoted over v{current}"


def _record_gate(registry: str, name: str, version: int, decision: dict[str, Any]) -> None:
    """Rewrite the version's ``meta.json`` (atomically) with the decision; weights untouched."""
    uri = storage.join(_version_uri(registry, name, version), names.META)
    meta = storage.read_json(uri)
    meta["gate"] = decision
    storage.write_json(uri, meta)


# ------------------------------------------------------------------- listing


def list_versions(registry_uri: str, name: str | None = None) -> dict:
    """All models (``name`` None) or the versions of one model."""
    registry = storage.normalize(registry_uri)
    if name is None:
        models = [_model_summary(registry, n) for n in _model_names(registry)]
        return {"registry": registry, "models": models}
    if not _is_model(registry, _check_name(name)):
        raise _missing_model(registry, name)
    champ = _read_aliases(registry, name)[CHAMPION]
    versions = [_version_summary(registry, name, v, champ) for v in _version_dirs(registry, name)]
    return {"name": name, "registry": registry, "champion": champ,
            "versions": [v for v in versions if v is not None]}


def _model_summary(registry: str, name: str) -> dict[str, Any]:
    return {"name": name, "versions": len(_version_dirs(registry, name)),
            "champion": _read_aliases(registry, name)[CHAMPION]}


def _version_summary(registry: str, name: str, version: int, champ: int | None) -> dict | None:
    try:
        meta = _read_version_meta(registry, name, version)
    except artifact.ArtifactError:
        return None  # incomplete (no meta.json yet): not a version
    return {"version": version, "created": meta.get("created"), "metrics": meta.get("metrics"),
            "parent": meta.get("parent"), "aliases": [CHAMPION] if version == champ else [],
            "gate": meta.get("gate")}


def show(registry_uri: str, ref: str) -> dict:
    """Full meta of the version ``ref`` names, plus ``aliases``, ``ref`` and ``uri``."""
    registry = storage.normalize(registry_uri)
    name, version = _resolve_version(registry, ref)
    champ = _read_aliases(registry, name)[CHAMPION]
    return {**_read_version_meta(registry, name, version),
            "aliases": [CHAMPION] if version == champ else [],
            "ref": _ref(name, version), "uri": _version_uri(registry, name, version)}


# ------------------------------------------------------------------- console


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def format_list(listing: dict[str, Any]) -> str:
    """:func:`list_versions`'s result as a table for people (``--json`` gives the dict)."""
    if "models" in listing:
        if not listing["models"]:
            return f"no models in {listing['registry']}"
        rows = [[m["name"], str(m["versions"]), f"v{m['champion']}" if m["champion"] is not None else "-"]
                for m in listing["models"]]
        return f"registry {listing['registry']}\n" + _table(["NAME", "VERSIONS", "CHAMPION"], rows)
    rows = []
    for v in listing["versions"]:
        metrics = v.get("metrics") or {}
        gate_ = v.get("gate") or {}
        decided = "-" if not gate_ else ("promoted" if gate_.get("promoted") else "kept champion")
        rows.append([f"v{v['version']}", ",".join(v["aliases"]) or "-", _cell(metrics.get("holdout_accuracy")),
                     _cell(metrics.get("best_val_accuracy", metrics.get("val_accuracy"))), decided,
                     _cell(v.get("parent")), _cell(v.get("created"))])
    head = f"{listing['name']} in {listing['registry']}"
    return head + "\n" + _table(["VERSION", "ALIASES", "HOLDOUT_ACC", "VAL_ACC", "GATE", "PARENT", "CREATED"], rows)


def format_show(meta: dict[str, Any]) -> str:
    """:func:`show`'s result as ``key  value`` lines (config and classes summarised)."""
    classes = meta.get("classes") or []
    shown = {
        "ref": meta.get("ref"), "aliases": ", ".join(meta.get("aliases") or []) or "-",
        "uri": meta.get("uri"), "arch": meta.get("arch"),
        "classes": f"{len(classes)}: {', '.join(map(str, classes[:10]))}{' ...' if len(classes) > 10 else ''}",
        "image_size": meta.get("image_size"), "mean": meta.get("mean"), "std": meta.get("std"),
        "pretrained": meta.get("pretrained"), "parent": meta.get("parent"), "source": meta.get("source"),
        "created": meta.get("created"), "weights_sha256": meta.get("weights_sha256"),
        "data_manifest_sha256": meta.get("data_manifest_sha256"),
    }
    for key, value in sorted((meta.get("metrics") or {}).items()):
        shown[f"metrics.{key}"] = value
    if meta.get("gate"):
        shown["gate"] = meta["gate"].get("reason")
    width = max(len(k) for k in shown)
    lines = [f"{k.ljust(width)}  {_cell(v)}" for k, v in shown.items()]
    return "\n".join(lines) + "\n(--json prints every field, the training config included)"
