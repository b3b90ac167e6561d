"""Starting a project: ``imgpipe init --preset NAME [FILE]`` and the weights' normalization.

What this module owns:

- writing a preset's complete, commented config file (the presets themselves and the
  rendering are :data:`pipeline.config.PRESETS` and :func:`pipeline.config.preset_text`);
- :func:`weights_normalization`: the mean/std that the weights ``model.pretrained`` names
  were trained with, which :func:`pipeline.config.load` uses for ``augment.mean/std``
  left unset (and warns about when they were set to something else).
"""

from __future__ import annotations

import torchvision

from pipeline import config, storage
from pipeline.errors import UserError
from pipeline.models import pretrained


def weights_normalization(spec: str, arch: str | None = None) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of the named weights; for a weights file of a ``timm/<name>`` arch,
    timm's pretrained config for it; None when ``spec`` names no weights (a URI, a
    checkpoint, a registry reference) of a timm arch, or torchvision does not know the name."""
    if not pretrained.is_weights_name(spec):
        return pretrained.timm_normalization(arch) if arch else None
    if spec == pretrained.LITE0_SPEC:
        return list(pretrained.IMAGENET_MEAN), list(pretrained.IMAGENET_STD)
    try:
        preset = torchvision.models.get_weight(spec).transforms()  # builds the transform; downloads nothing
    except (ValueError, KeyError, AttributeError, TypeError):
        return None  # an unknown name: training names the error itself
    mean, std = getattr(preset, "mean", None), getattr(preset, "std", None)
    return (list(mean), list(std)) if mean is not None and std is not None else None


def write(preset: str, path: str | None, force: bool = False) -> dict[str, str]:
    """Write preset ``preset``'s config to ``path`` (default ``<preset>.yaml``); refuses
    to overwrite an existing file unless ``force``."""
    text = config.preset_text(preset)
    path = path or f"{preset}.yaml"
    if storage.exists(path) and not force:
        raise UserError(f"{path} exists; choose another FILE or pass --force to overwrite it")
    storage.write_bytes(path, text.encode())
    return {"preset": preset, "config": storage.normalize(path)}
