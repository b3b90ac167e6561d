"""timm architectures by name (``model.arch: timm/<name>``), their weights from a file at
any storage URI, EfficientNet-Lite0 on timm, and the one-line errors without timm or
for a name timm does not know."""

import subprocess
import sys

import pytest
import torch

from pipeline import storage
from pipeline.errors import UserError
from pipeline.models import artifact, pretrained
from pipeline.models import zoo as models
from tests.conftest import small_config

SMALL_NET = "timm/mobilenetv3_small_050"  # 0.4 M parameters: a fast real timm net


def imgpipe(*args, pre="pass", timeout=300):
    """``python -m pipeline ARGS`` with ``pre`` run first (e.g. hiding timm)."""
    code = f"import runpy, sys; {pre}; sys.argv = ['imgpipe', *{list(args)!r}]; " \
           "runpy.run_module('pipeline', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


HIDE_TIMM = "sys.modules['timm'] = None"  # import timm fails, find_spec('timm') is None: as if not installed


@pytest.mark.parametrize("arch,head", [("timm/resnet18", {"fc.weight", "fc.bias"}),
                                       (SMALL_NET, {"classifier.weight", "classifier.bias"})])
def test_build_and_forward(arch, head):
    pytest.importorskip("timm")
    model = models.build_model(arch, 7, dropout=0.1)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert models.head_parameters(model) == head


def test_unknown_timm_name_lists_close_matches():
    pytest.importorskip("timm")
    with pytest.raises(UserError, match=r"unknown timm model 'resnet1x' in model.arch timm/resnet1x; "
                                        r"close: .*timm/resnet18"):
        models.build_model("timm/resnet1x", 3)
    with pytest.raises(UserError, match="close: .*timm/mobilenetv3_small_100"):
        models.build_model("timm/mobilenet_v3_small", 3)


def test_without_timm_a_timm_arch_names_the_extra_and_lite0_is_hand_written(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match=r"needs the package timm.*pip install 'imgpipe\[timm\]'"):
        models.build_model("timm/resnet18", 3)
    lite0 = models.build_model("efficientnet_lite0", 3)
    assert isinstance(lite0, pretrained.EfficientNetLite0)
    assert pretrained.timm_normalization("timm/resnet18") is None


def test_lite0_on_timm_matches_the_hand_written_copy_on_a_photo(monkeypatch):
    """The shipped ImageNet weights give the same logits in timm's efficientnet_lite0 and
    in the hand-written copy (same tensor names, eps 1e-3, momentum 0.01)."""
    pytest.importorskip("timm")
    from sklearn.datasets import load_sample_images
    from torchvision.transforms import v2 as T

    state = pretrained.load_for(pretrained.LITE0_SPEC, pretrained.LITE0)
    on_timm = models.build_model(pretrained.LITE0, 1000)
    assert not isinstance(on_timm, pretrained.EfficientNetLite0)
    on_timm.load_state_dict(state)  # strict: every name and shape agrees
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "timm", None)
        by_hand = models.build_model(pretrained.LITE0, 1000)
    by_hand.load_state_dict(state)
    photos = [torch.from_numpy(img.copy()).permute(2, 0, 1) for img in load_sample_images().images]
    prep = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD)])
    x = torch.stack([prep(p) for p in photos])
    with torch.no_grad():
        a, b = on_timm.eval()(x), by_hand.eval()(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.softmax(1).max() > 0.2  # a real photo, real weights: a confident class


def test_weights_from_a_local_file_and_s3(tmp_path, s3_bucket):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    source = models.build_model(SMALL_NET, 1000)  # stands for timm's ImageNet weights, fetched by the user
    want = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save(want, tmp_path / "w.pt")
    save_file(want, str(tmp_path / "w.safetensors"))
    storage.write_bytes(f"{s3_bucket}/w.safetensors", (tmp_path / "w.safetensors").read_bytes())
    for uri in (str(tmp_path / "w.pt"), str(tmp_path / "w.safetensors"), f"{s3_bucket}/w.safetensors"):
        got = pretrained.read_weights(uri)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), uri
    model = models.build_model(SMALL_NET, 10)
    report = models.load_pretrained(model, got, "w.safetensors")
    assert report == {"missing": [], "unexpected": [], "skipped": ["classifier.bias", "classifier.weight"]}
    assert torch.equal(model.conv_stem.weight, want["conv_stem.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read safetensors file"):
        pretrained.read_weights(str(tmp_path / "bad.safetensors"))


def test_normalization_from_timms_pretrained_config():
    pytest.importorskip("timm")
    assert pretrained.timm_normalization("timm/resnet18") == (list(pretrained.IMAGENET_MEAN),
                                                              list(pretrained.IMAGENET_STD))
    mean, std = pretrained.timm_normalization("timm/vit_tiny_patch16_224")  # trained with 0.5/0.5
    assert mean == [0.5, 0.5, 0.5] and std == [0.5, 0.5, 0.5]
    assert pretrained.timm_normalization("resnet18") is None


def test_a_timm_weights_file_brings_timms_normalization_into_the_config(tmp_path):
    """model.pretrained naming a weights file for a timm arch, augment.mean/std unset: the
    config takes timm's normalization for that arch (as for named torchvision weights)."""
    pytest.importorskip("timm")
    from pipeline import config
    from pipeline.workflows import presets

    sets = ["model.arch=timm/vit_tiny_patch16_224", f"model.pretrained={tmp_path / 'w.safetensors'}"]
    cfg = config.load(None, sets, weights_norm=presets.weights_normalization)
    assert cfg.augment.mean == [0.5, 0.5, 0.5] and cfg.augment.std == [0.5, 0.5, 0.5]
    cfg = config.load(None, ["model.arch=timm/resnet18", f"model.pretrained={tmp_path / 'w.pt'}"],
                      weights_norm=presets.weights_normalization)
    assert cfg.augment.mean == list(pretrained.IMAGENET_MEAN)


@pytest.mark.slow  # 90 s in CI; timm is optional
def test_train_then_predict_a_timm_net(packed, tmp_path):
    """A real 1-epoch training of a timm net from a local weights file, then predict with
    its checkpoint: the checkpoint records the arch, so predict rebuilds it."""
    pytest.importorskip("timm")
    from pipeline.inference import predict
    from pipeline.training import driver

    weights = tmp_path / "imagenet.pt"
    torch.save(models.build_model(SMALL_NET, 1000).state_dict(), weights)
    cfg = small_config(data={"manifest": packed}, model={"arch": SMALL_NET, "pretrained": str(weights)},
                       train={"epochs": 1, "storage": str(tmp_path / "runs"), "run_name": "timm1"})
    trained = driver.run(cfg, quiet=True)
    ckpt = trained["best_checkpoint_uri"]
    assert artifact.read_meta(ckpt)["arch"] == SMALL_NET
    out = predict.run(ckpt, f"{packed}:test", str(tmp_path / "pred"), small_config(), quiet=True)
    assert out["rows"] == 30 and out["errors"] == 0
    table = predict.read_predictions(str(tmp_path / "pred"))
    assert table.num_rows == 30 and set(table.column("label").to_pylist()) <= set(range(10))


def _train_args(packed, tmp_path, arch):
    (tmp_path / "c.yaml").write_text("model:\n  arch: smallcnn\n")
    return ["train", str(tmp_path / "c.yaml"), "--set", f"data.manifest={packed}", "--set", f"train.storage={tmp_path}",
            "--set", f"model.arch={arch}"]


def test_cli_without_timm_names_the_extra(packed, tmp_path):
    r = imgpipe(*_train_args(packed, tmp_path, "timm/resnet18"), pre=HIDE_TIMM)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "needs the package timm" in line and "pip install 'imgpipe[timm]'" in line


def test_cli_unknown_timm_name_lists_close_matches(packed, tmp_path):
    pytest.importorskip("timm")
    r = imgpipe(*_train_args(packed, tmp_path, "timm/resnet1x"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "unknown timm model 'resnet1x'" in line and "timm/resnet18" in line
