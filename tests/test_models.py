"""Model zoo: names, head sizing, pretrained loading reports."""

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import zoo as models


def test_smallcnn_and_torchvision_heads():
    m = models.build_model("smallcnn", 7)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    r = models.build_model("resnet18", 4)
    assert r.fc.out_features == 4
    assert models.head_parameters(r) == {"fc.weight", "fc.bias"}
    assert "resnet50" in models.available() and "efficientnet_b0" in models.available()


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UserError, match="unknown model.arch 'nope'; valid: smallcnn, alexnet"):
        models.build_model("nope", 3)


def test_load_pretrained_replaces_head_and_reports():
    src = models.build_model("smallcnn", 10)
    dst = models.build_model("smallcnn", 3)
    state = dict(src.state_dict())
    state["extra.weight"] = torch.zeros(1)
    report = models.load_pretrained(dst, state, "test")
    assert report["unexpected"] == ["extra.weight"]
    assert "fc.weight" in report["skipped"]
    assert torch.equal(dst.features[0].weight, src.features[0].weight)
    with pytest.raises(UserError, match="share no tensor"):
        models.load_pretrained(dst, {"x": torch.zeros(1)}, "bad")
