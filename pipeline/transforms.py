"""Train and eval transforms (presets) and the Ray Data actor that applies them.

Like torchvision's ``references/classification/presets.py``: :class:`TrainPreset`
and :class:`EvalPreset` map one decoded RGB image to a uint8 CHW tensor of the
model's input size. They run on CPU in a Ray Data actor pool
(:class:`AugmentBatch`), so only uint8 crosses the wire to training workers; the
float conversion and normalization happen on the worker (:func:`to_input`).

Augmentation is reproducible: each image's random draws are seeded from
``(seed, epoch, image_id)``; the epoch comes from a tiny named actor
(:class:`EpochClock`) that training workers advance before each epoch.

With ``augment.device`` ``cuda`` (or ``worker``), :class:`WorkerAugment` does the same
inside each training worker instead: JPEGs decoded in batches with
``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on a GPU), the same presets
applied on the worker's device, so only encoded bytes cross the wire.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from pipeline import images
from pipeline.config import AugmentConfig
from pipeline.data import stream

IMAGENET_EVAL_CROP = 0.875  # resize to size/0.875 then center crop, as torchvision's references


class TrainPreset:
    """Random train-time transform of one uint8 CHW RGB tensor."""

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        ops: list[Any] = []
        if cfg.preset == "imagenet":
            ops.append(v2.RandomResizedCrop(size, scale=tuple(cfg.scale), antialias=True))
        else:
            ops.append(v2.Resize((size, size), antialias=True))
            if cfg.preset == "digits" and cfg.pad > 0:
                ops.append(v2.RandomCrop(size, padding=cfg.pad))
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if cfg.rotation > 0:
            ops.append(v2.RandomRotation(cfg.rotation, interpolation=InterpolationMode.BILINEAR))
        if cfg.color_jitter > 0:
            j = cfg.color_jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        if cfg.auto_augment == "trivial":
            ops.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
        elif cfg.auto_augment == "rand":
            ops.append(v2.RandAugment(interpolation=InterpolationMode.BILINEAR))
        self.transform = v2.Compose(ops)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.transform(img)


class EvalPreset:
    """Deterministic eval transform: resize (+ center crop for imagenet) to ``size``."""

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        if cfg.preset == "imagenet":
            self.transform = v2.Compose([v2.Resize(int(round(size / IMAGENET_EVAL_CROP)), antialias=True),
                                         v2.CenterCrop(size)])
        else:
            self.transform = v2.Resize((size, size), antialias=True)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.transform(img)


def sample_seed(seed: int, epoch: int, image_id: str) -> int:
    """The RNG seed of one image's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def augment_one(transform, img: torch.Tensor, seed: int, epoch: int, image_id: str) -> torch.Tensor:
    """``transform(img)`` with its random draws seeded from ``(seed, epoch, image_id)``."""
    torch.manual_seed(sample_seed(seed, epoch, image_id))
    return transform(img)


def decode_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 CHW RGB tensor (EXIF applied; raises images.ImageError)."""
    return torch.from_numpy(images.decode_rgb(data)).permute(2, 0, 1).contiguous()


class EvalTransform:
    """The one eval transform, for every scorer (val during training, evaluate, predict):
    encoded bytes -> decoded RGB (EXIF applied, see :mod:`pipeline.images`) -> the eval
    preset -> uint8 CHW of ``size`` x ``size``."""

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        self.preset, self.size = EvalPreset(cfg, size), size

    def one(self, data: bytes) -> np.ndarray:
        """One image; raises :class:`pipeline.images.ImageError` on undecodable bytes."""
        return self.preset(decode_tensor(bytes(data))).numpy()

    def __call__(self, blobs) -> np.ndarray:
        out = np.empty((len(blobs), 3, self.size, self.size), dtype=np.uint8)
        for i, data in enumerate(blobs):
            out[i] = self.one(data)
        return out


class AugmentBatch:
    """Ray Data ``map_batches`` class: decode + train (or eval) transform a batch.

    Input columns ``image`` (bytes), ``label``, ``image_id``; output ``image`` (uint8
    N x 3 x S x S), ``label`` (int64), ``image_id``. An image that fails to decode
    (packing validated every shard image, so this means corruption) raises.
    """

    def __init__(self, cfg: dict[str, Any], size: int, train: bool, seed: int,
                 clock_name: str | None = None) -> None:
        acfg = AugmentConfig(**cfg)
        self.transform = TrainPreset(acfg, size) if train else EvalPreset(acfg, size)
        self.train, self.seed, self.size = train, seed, size
        self.clock = None
        if train and clock_name:
            self.clock = stream.epoch_clock(clock_name)
        torch.set_num_threads(1)  # one actor = one core; parallelism comes from the pool

    def _epoch(self) -> int:
        if self.clock is None:
            return 0
        import ray

        return int(ray.get(self.clock.get.remote()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = self._epoch() if self.train else 0
        out = np.empty((len(batch["image"]), 3, self.size, self.size), dtype=np.uint8)
        for i, (data, image_id) in enumerate(zip(batch["image"], batch["image_id"])):
            img = decode_tensor(bytes(data))
            out[i] = (augment_one(self.transform, img, self.seed, epoch, str(image_id)) if self.train
                      else self.transform(img)).numpy()
        result = {"image": out, "label": batch["label"].astype(np.int64), "image_id": batch["image_id"]}
        if "row" in batch:  # the training stream's row numbers (exact resume)
            result["row"] = batch["row"]
        return result


def _gpu_decodable(data: bytes) -> bool:
    """Baseline/progressive JPEGs in RGB or gray without an EXIF rotation: what the
    CUDA decoder handles exactly like the CPU path (it ignores EXIF orientation)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # headers only
            return im.format == "JPEG" and im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except Exception:  # noqa: BLE001 - anything odd takes the careful CPU path
        return False


class WorkerAugment:
    """Decode + train transform inside a training worker, on its device.

    JPEGs are decoded together with ``torchvision.io.decode_jpeg`` on ``device`` (one
    nvJPEG call per batch on a GPU); other formats, CMYK and EXIF-rotated JPEGs go
    through :func:`decode_tensor` on CPU and are copied over. Each image's random draws
    are seeded from ``(seed, epoch, image_id)``, as in :class:`AugmentBatch`.
    """

    def __init__(self, cfg: AugmentConfig, size: int, seed: int, device: torch.device) -> None:
        self.transform = TrainPreset(cfg, size)
        self.size, self.seed, self.device = size, seed, device

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(blobs)
        fast = [i for i, b in enumerate(blobs) if _gpu_decodable(b)]
        if fast:
            data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in fast]
            for i, img in zip(fast, decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)):
                out[i] = img
        for i, img in enumerate(out):
            if img is None:
                out[i] = decode_tensor(blobs[i]).to(self.device)
        return out  # type: ignore[return-value]

    def __call__(self, blobs, image_ids, epoch: int) -> torch.Tensor:
        """Encoded images -> uint8 N x 3 x S x S on the device."""
        imgs = self.decode([bytes(b) for b in blobs])
        out = torch.empty((len(imgs), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        for i, (img, image_id) in enumerate(zip(imgs, image_ids)):
            out[i] = augment_one(self.transform, img, self.seed, epoch, str(image_id))
        return out


def to_input(images_u8: torch.Tensor, mean: list[float], std: list[float], device: torch.device,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalized float on ``device`` (conversion after the copy)."""
    x = images_u8.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s
