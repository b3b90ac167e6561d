"""The one inference path: the Ray Data stages that turn stored images into scores.

:mod:`pipeline.inference.predict` (stored images -> predictions Parquet) and
:mod:`pipeline.inference.evaluate` (a packed split -> accuracy and per-image results)
both build their job from these stages (the read tasks are in
:mod:`pipeline.inference.tasks`, which stays free of torch)::

    tasks.read_snapshot | tasks.read_split  -> rows: source, bytes, image_id, error, truth
      -> DecodeActor (CPU pool)             -> + image: uint8 N x 3 x S x S (transforms.EvalTransform)
      -> ModelActor (model pool; one GPU each with predict.num_gpus; with predict.gpu_decode
         it decodes the bytes itself, transforms.decode_batch on its device, and there
         is no DecodeActor)                 -> image_id, source, truth, label, label_name, score,
                                               topk_labels, topk_scores, topk_label_names,
                                               truth_score, model,
                                               run_id, error

A row is never dropped: an image that cannot be read or decoded keeps its row with a
non-empty ``error`` (``"reason: message"``) so callers can quarantine or count it;
``truth`` is the true class index (-1 when unknown) and ``truth_score`` its
probability (NaN when unknown).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch
import torchvision

from pipeline import images, registry, storage
from pipeline.config import AugmentConfig, Config
from pipeline.errors import UserError
from pipeline.inference.tasks import READ_BATCH
from pipeline.models import artifact, pretrained, zoo
from pipeline.ops import preflight
from pipeline.ops.runtime import PredictResources, ensure_ray, predict_resources
from pipeline.transforms import EvalTransform, to_input


@dataclass(frozen=True)
class Scorer:
    """A model resolved and verified on the driver, and how its inputs are prepared."""

    uri: str  # the artifact folder the actors load, or the pretrained weights' name
    name: str  # ``name@vN`` for registry models, the weights' name, else the artifact URI
    meta: dict[str, Any]
    eval_augment: AugmentConfig  # the run's augment config with the model's eval preset
    image_size: int  # px, the model's input size

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


def model_id(meta: dict[str, Any], uri: str) -> str:
    """``name@vN`` for registry models, else the checkpoint URI."""
    if meta.get("name") and meta.get("version"):
        return f"{meta['name']}@v{meta['version']}"
    return uri


def _weights_meta(spec: str) -> dict[str, Any]:
    """arch, classes, input size and normalization of pretrained weights ``spec``
    (``efficientnet_lite0:imagenet`` or a torchvision weights name)."""
    if spec == pretrained.LITE0_SPEC:  # trained on ImageNet-1k, torchvision's class order and eval recipe
        classes = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
        return {"arch": pretrained.LITE0, "classes": list(classes), "image_size": 224,
                "mean": list(pretrained.IMAGENET_MEAN), "std": list(pretrained.IMAGENET_STD)}
    try:
        weights = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"--model {spec}: unknown torchvision weights (e.g. ResNet18_Weights.IMAGENET1K_V1)") from None
    arch = next((m for m in torchvision.models.list_models(module=torchvision.models)
                 if torchvision.models.get_model_weights(m) is type(weights)), None)
    if arch is None:
        raise UserError(f"--model {spec}: no classifier in torchvision.models takes these weights")
    t = weights.transforms()
    return {"arch": arch, "classes": list(weights.meta["categories"]), "image_size": int(t.crop_size[0]),
            "mean": list(t.mean), "std": list(t.std)}


def _weights_scorer(spec: str, cfg: Config) -> Scorer:
    """``--model`` naming pretrained weights: their own classes, input size and normalization,
    the ImageNet eval recipe (resize, center crop)."""
    meta = _weights_meta(spec)
    state = pretrained.resolve_pretrained(spec, meta["arch"])  # exit 2 here when not installed / not downloadable
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    meta.update(weights_sha256=digest.hexdigest(), weights_name=spec, eval_preset="imagenet")
    eval_augment = dataclasses.replace(cfg.augment, preset="imagenet", mean=meta["mean"], std=meta["std"])
    return Scorer(spec, spec, meta, eval_augment, meta["image_size"])


def load_scorer(model_ref: str, cfg: Config) -> Scorer:
    """Resolve and verify ``--model`` (registry ref, checkpoint URI, or pretrained weights
    name as in ``model.pretrained``); exit 2 if unusable."""
    if pretrained.is_weights_name(model_ref):
        return _weights_scorer(model_ref, cfg)
    art = artifact.load(registry.resolve_model(model_ref, cfg.registry.uri))
    preset = art.meta.get("eval_preset", cfg.augment.preset)
    eval_augment = dataclasses.replace(cfg.augment, preset=preset)
    return Scorer(art.uri, model_id(art.meta, art.uri), art.meta, eval_augment, int(art.meta["image_size"]))


def start(cfg: Config, scorer: Scorer, what: str, quiet: bool) -> PredictResources:
    """Start or join Ray, check the cluster can hold the stages (preflight), size the pools."""
    ensure_ray(cfg, quiet=quiet)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    preflight.check(preflight.predict_request(cfg, cpus, image_size=scorer.image_size), what, cfg)
    return predict_resources(cfg, cpus)


# ------------------------------------------------------------------------ actors


class DecodeActor:
    """Ray Data actor: bytes -> eval-transformed uint8 CHW (:class:`EvalTransform`);
    an undecodable image gets its ``error``."""

    def __init__(self, eval_augment: AugmentConfig, size: int) -> None:
        self.transform, self.size = EvalTransform(eval_augment, size), size
        torch.set_num_threads(1)  # one actor = one core; parallelism comes from the pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["source"])
        out = np.zeros((n, 3, self.size, self.size), dtype=np.uint8)
        errors = list(batch["error"])
        for i in range(n):
            if not errors[i]:
                try:
                    out[i] = self.transform.one(batch["bytes"][i])
                except images.ImageError as e:
                    errors[i] = f"{e.reason}: {e}"
        rest = {k: v for k, v in batch.items() if k not in ("bytes", "error")}
        return {**rest, "image": out, "error": np.array(errors, dtype=object)}



@dataclass(frozen=True)
class ModelSpec:
    """What a :class:`ModelActor` needs besides the scorer."""

    run_id: str  # written into every predictions row
    topk: int  # labels and scores kept per image
    batch_size: int  # images per model call
    threads: int  # torch intra-op threads in a CPU actor
    compile_model: bool = False  # torch.compile (GPU)
    gpu_decode: bool = False  # decode the bytes here, on the model's device


class ModelActor:
    """Ray Data actor holding the model: uint8 images (or, with ``gpu_decode``, bytes)
    -> label, score, top-k and the true label's probability."""

    def __init__(self, scorer: Scorer, spec: ModelSpec, opts: storage.StorageOptions) -> None:
        storage.configure(opts)
        self.scorer, self.spec = scorer, spec
        self.classes = scorer.classes
        self.topk = min(spec.topk, len(self.classes))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.transform = EvalTransform(scorer.eval_augment, scorer.image_size)
        torch.set_num_threads(max(1, spec.threads))
        weights_name = scorer.meta.get("weights_name")  # set by load_scorer for pretrained weights only
        state = pretrained.resolve_pretrained(weights_name, scorer.meta["arch"]) if weights_name \
            else artifact.load(scorer.uri).state_dict
        model = zoo.build_model(scorer.meta["arch"], len(self.classes))
        model.load_state_dict(state)
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            if spec.compile_model:
                model = torch.compile(model)
        self.model = model

    def decode(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """``gpu_decode``: bytes -> eval-transformed images on the model's device."""
        errors = list(batch["error"])
        ok = [i for i, e in enumerate(errors) if not e]
        imgs, new_errors = self.transform.on_device([bytes(batch["bytes"][i]) for i in ok], self.device)
        out = torch.zeros((len(errors), 3, self.scorer.image_size, self.scorer.image_size), dtype=torch.uint8,
                          device=self.device)
        out[ok] = imgs
        for i, e in zip(ok, new_errors):
            errors[i] = e
        return {**batch, "image": out, "error": np.array(errors, dtype=object)}

    def probabilities(self, images_u8: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 N x 3 x S x S -> softmax over the classes (float32, on the device)."""
        x = images_u8 if torch.is_tensor(images_u8) else torch.from_numpy(images_u8)
        cuda = self.device.type == "cuda"
        x = to_input(x, self.scorer.meta["mean"], self.scorer.meta["std"], self.device, channels_last=cuda)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            return torch.softmax(self.model(x).float(), dim=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.spec.gpu_decode:
            batch = self.decode(batch)
        n = len(batch["source"])
        truth = np.asarray(batch["truth"]).astype(np.int64)
        top_l = np.zeros((n, self.topk), dtype=np.int32)
        top_s = np.zeros((n, self.topk), dtype=np.float32)
        truth_s = np.full(n, np.nan, dtype=np.float32)
        idx = np.flatnonzero([not e for e in batch["error"]])
        for start in range(0, len(idx), self.spec.batch_size):
            sel = idx[start:start + self.spec.batch_size]
            probs = self.probabilities(batch["image"][sel])
            s, lab = probs.topk(self.topk, dim=1)
            top_l[sel], top_s[sel] = lab.cpu().numpy(), s.cpu().numpy()
            known = torch.from_numpy(truth[sel]).to(self.device)
            picked = probs.gather(1, known.clamp(min=0).unsqueeze(1)).squeeze(1).cpu().numpy()
            truth_s[sel] = np.where(truth[sel] >= 0, picked, np.nan)
        labels = np.where([bool(e) for e in batch["error"]], -1, top_l[:, 0]).astype(np.int32)
        return {"image_id": batch["image_id"], "source": batch["source"], "truth": batch["truth"],
                "label": labels, "label_name": np.array([self.classes[i] if i >= 0 else "" for i in labels], dtype=object),
                "score": top_s[:, 0].copy(), "topk_labels": list(top_l), "topk_scores": list(top_s),
                "topk_label_names": [[self.classes[i] for i in row] for row in top_l],
                "truth_score": truth_s, "model": np.array([self.scorer.name] * n, dtype=object),
                "run_id": np.array([self.spec.run_id] * n, dtype=object), "error": batch["error"]}


def score_here(batches: Iterable[dict[str, np.ndarray]], scorer: Scorer, spec: ModelSpec) -> Iterator[dict[str, Any]]:
    """The same stages run in this process, batch by batch: for a split so small that
    starting the actor pools (each a process importing torch: seconds of CPU) would cost
    more than scoring it (see :data:`HERE_MAX_PIXELS`). Torch's thread count is restored."""
    threads = torch.get_num_threads()
    try:
        decode = None if spec.gpu_decode else DecodeActor(scorer.eval_augment, scorer.image_size)
        model = ModelActor(scorer, dataclasses.replace(spec, threads=threads), storage.default_options())
        for batch in batches:
            yield model(batch if decode is None else decode(batch))
    finally:
        torch.set_num_threads(threads)


HERE_MAX_PIXELS = 4096 * 32 * 32  # input px of a split scored in the driver (score_here) on CPU


def score(ds: ray.data.Dataset, scorer: Scorer, spec: ModelSpec, cfg: Config,
          res: PredictResources) -> ray.data.Dataset:
    """Input rows -> scored rows: the decode actor pool (unless ``spec.gpu_decode``),
    then the model actor pool, sized by ``cfg.predict`` and ``res``."""
    p = cfg.predict
    if not spec.gpu_decode:
        ds = ds.map_batches(DecodeActor, fn_constructor_kwargs={"eval_augment": scorer.eval_augment,
                                                                "size": scorer.image_size},
                            compute=ray.data.ActorPoolStrategy(size=p.decode_actors),
                            num_cpus=res.decode_cpus, batch_size=READ_BATCH)
    return ds.map_batches(ModelActor, fn_constructor_kwargs={"scorer": scorer, "spec": spec,
                                                             "opts": storage.default_options()},
                          compute=ray.data.ActorPoolStrategy(size=p.model_actors), num_cpus=res.model_cpus,
                          num_gpus=p.num_gpus, batch_size=p.batch_size)
