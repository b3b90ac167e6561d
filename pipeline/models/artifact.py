"""Model artifacts: the folder format shared by checkpoints, the registry and predict.

Owns writing, reading and verifying one artifact folder (any storage URI), holding

- ``weights.pt``: a plain ``state_dict`` saved with ``torch.save`` and loaded with
  ``torch.load(..., weights_only=True)``: no pickled code ever runs on load;
- ``meta.json``: what is needed to rebuild and trust the model: ``arch``, ``classes``,
  ``image_size``, ``mean``, ``std``, ``weights_sha256``, plus free-form provenance
  (``metrics``, ``config``, ``data_manifest_sha256``, ``parent``, ``created``), with
  every URI's ``user:password@`` redacted (:func:`pipeline.storage.redact`).

Weights are written before ``meta.json``, so a folder with a ``meta.json`` is complete;
a weights file whose sha256 disagrees with the meta is refused.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import names, storage
from pipeline.errors import UserError

# Aliases for callers that still spell these ``artifact.*``; new code uses pipeline.names.
WEIGHTS = names.WEIGHTS
META = names.META


class ArtifactError(UserError):
    """A model artifact that is missing, incomplete or corrupt."""


@dataclass
class ModelArtifact:
    uri: str
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(uri: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Write an artifact folder at ``uri``; returns the meta as written."""
    data = weights_bytes(state_dict)
    meta = storage.redact(dict(meta))  # provenance (config, URIs) is written: no URI passwords
    meta["weights_sha256"] = sha256(data)
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for key in ("arch", "classes", "image_size", "mean", "std"):
        if key not in meta:
            raise ValueError(f"artifact meta needs '{key}'")
    storage.write_bytes(storage.join(uri, names.WEIGHTS), data)
    storage.write_json(storage.join(uri, names.META), meta)  # last: its presence commits the folder
    return meta


def read_meta(uri: str) -> dict[str, Any]:
    meta_uri = storage.join(uri, names.META)
    try:
        return storage.read_json(meta_uri)
    except storage.NotFound:
        raise ArtifactError(f"no model at {uri} (missing {names.META})") from None
    except ValueError as e:
        raise ArtifactError(f"unreadable {meta_uri}: {e}") from None


def load(uri: str, verify: bool = True) -> ModelArtifact:
    """Read and verify an artifact: sha256 of the weights must match ``meta.json``."""
    meta = read_meta(uri)
    try:
        data = storage.read_bytes(storage.join(uri, names.WEIGHTS))
    except storage.NotFound:
        raise ArtifactError(f"model at {uri} has no {names.WEIGHTS}") from None
    digest = sha256(data)
    if verify and meta.get("weights_sha256") and digest != meta["weights_sha256"]:
        raise ArtifactError(
            f"weights sha256 mismatch for {uri}: meta says {meta['weights_sha256'][:12]}..., "
            f"file is {digest[:12]}...; refusing to load"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad artifact
        raise ArtifactError(f"cannot load weights of {uri}: {str(e).splitlines()[0]}") from None
    return ModelArtifact(uri=uri, meta=meta, state_dict=state)
