"""Image transforms: decoding for models, the train and eval presets, and where they run.

Like torchvision's ``references/classification/presets.py``: :class:`TrainPreset`
and :class:`EvalPreset` map one decoded RGB image to a uint8 CHW tensor of the
model's input size; :func:`to_input` makes the normalized float input on the
model's device. This module owns:

- decoding: :func:`decode_tensor` (one image, PIL via :mod:`pipeline.images`: EXIF
  orientation, CMYK, alpha, bomb guard) and :func:`decode_batch` (many images on a
  device: plain JPEGs in one ``torchvision.io.decode_jpeg`` call, nvJPEG on a GPU,
  everything else through :func:`decode_tensor`, so both give the same pixels);
- :class:`EvalTransform`, the one eval transform (decode + :class:`EvalPreset`) of
  every scorer;
- the train transform in its two places: :class:`AugmentBatch` (a Ray Data actor
  pool, ``augment.device=cpu``) and :class:`WorkerAugment` (inside a training worker,
  on its device). Each image's random draws are seeded from ``(seed, epoch,
  image_id)`` (:func:`augment_one`); the epoch is the training stream's ``epoch``
  column (:func:`pipeline.data.stream.train_stream`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

from pipeline import images
from pipeline.config import AugmentConfig

IMAGENET_EVAL_CROP = 0.875  # resize to size/0.875 then center crop, as torchvision's references
EXIF_ORIENTATION = 0x0112  # EXIF tag: 1 = stored upright



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
    s = sample_seed(seed, epoch, image_id)
    if img.is_cuda:
        torch.manual_seed(s)  # CPU and CUDA generators
    else:
        # the CPU generator alone, which the transforms draw from: torch.manual_seed also
        # queues a lazy CUDA/MTIA seeding that formats a stack trace on every call when no
        # GPU is initialized, a third of this function's CPU on 16 px digits
        torch.default_generator.manual_seed(s)
    return transform(img)


def decode_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 CHW RGB tensor (EXIF applied; raises images.ImageError)."""
    return torch.from_numpy(images.decode_rgb(data)).permute(2, 0, 1).contiguous()


def plain_jpeg(data: bytes) -> bool:
    """A JPEG that ``decode_jpeg`` decodes exactly like :func:`decode_tensor`: baseline
    or progressive, RGB or grey, stored upright (no EXIF rotation) and within
    :data:`pipeline.images.MAX_PIXELS`. Reads the headers only."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return (im.format == "JPEG" and im.mode in ("RGB", "L") and w * h <= images.MAX_PIXELS
                    and im.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # noqa: BLE001 - anything odd takes the careful PIL path
        return False


def decode_batch(blobs: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor | images.ImageError]:
    """Encoded images -> uint8 CHW RGB tensors on ``device``, one per blob, or the
    :class:`pipeline.images.ImageError` that blob raised.

    Plain JPEGs (:func:`plain_jpeg`) are decoded together by
    ``torchvision.io.decode_jpeg(device=...)``: nvJPEG on a GPU, libjpeg-turbo on CPU.
    PNG & co., CMYK and EXIF-rotated JPEGs, and every JPEG of a batch call that failed
    (one corrupt file fails the call) go through :func:`decode_tensor` and are copied
    over, so EXIF orientation, colour conversion and error reasons are the CPU path's.
    """
    out: list[torch.Tensor | images.ImageError | None] = [None] * len(blobs)
    fast = [i for i, b in enumerate(blobs) if plain_jpeg(b)]
    if fast:
        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in fast]
        try:
            out_fast = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a corrupt or truncated JPEG: all take the careful path below
            out_fast = []
        for i, img in zip(fast, out_fast):
            out[i] = img
    for i, img in enumerate(out):
        if img is None:
            try:
                out[i] = decode_tensor(bytes(blobs[i])).to(device)
            except images.ImageError as e:
                out[i] = e
    return out  # type: ignore[return-value]


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

    def on_device(self, blobs: Sequence[bytes], device: torch.device) -> tuple[torch.Tensor, list[str]]:
        """Many images decoded by :func:`decode_batch` and transformed on ``device``:
        (uint8 N x 3 x S x S, per image ``""`` or ``"reason: message"``; zeros there)."""
        out = torch.zeros((len(blobs), 3, self.size, self.size), dtype=torch.uint8, device=device)
        errors = [""] * len(blobs)
        for i, img in enumerate(decode_batch(blobs, device)):
            if isinstance(img, images.ImageError):
                errors[i] = f"{img.reason}: {img}"
            else:
                out[i] = self.preset(img)
        return out, errors


class AugmentBatch:
    """Ray Data ``map_batches`` class: decode + train transform a batch on CPU.

    Input columns ``image`` (bytes), ``label``, ``image_id``, ``epoch`` (the training
    stream's, see :func:`pipeline.data.stream.train_stream`; other columns pass
    through); output ``image`` (uint8 N x 3 x S x S), ``label`` (int64). Each image's
    random draws are seeded from ``(seed, epoch, image_id)``, so the output does not
    depend on which actor ran it or when. An image that fails to decode (packing
    validated every shard image, so this means corruption) raises.
    """

    def __init__(self, cfg: dict[str, Any], size: int, seed: int) -> None:
        self.transform = TrainPreset(AugmentConfig(**cfg), size)
        self.seed, self.size = seed, size
        torch.set_num_threads(1)  # one actor = one core; parallelism comes from the pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = np.empty((len(batch["image"]), 3, self.size, self.size), dtype=np.uint8)
        decoded = decode_batch([bytes(b) for b in batch["image"]], "cpu")  # same pixels as decode_tensor
        for i, (img, image_id, epoch) in enumerate(zip(decoded, batch["image_id"], batch["epoch"])):
            if isinstance(img, images.ImageError):
                raise img
            out[i] = augment_one(self.transform, img, self.seed, int(epoch), str(image_id)).numpy()
        return {**batch, "image": out, "label": batch["label"].astype(np.int64)}


class WorkerAugment:
    """Decode + train transform inside a training worker, on its device.

    Decoding is :func:`decode_batch` (one nvJPEG call per batch on a GPU); each
    image's random draws are seeded from ``(seed, epoch, image_id)``, as in
    :class:`AugmentBatch`. An undecodable image raises (shards hold validated images).
    """

    def __init__(self, cfg: AugmentConfig, size: int, seed: int, device: torch.device) -> None:
        self.transform = TrainPreset(cfg, size)
        self.size, self.seed, self.device = size, seed, device

    def decode(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        out = decode_batch(blobs, self.device)
        for img in out:
            if isinstance(img, images.ImageError):
                raise img
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
