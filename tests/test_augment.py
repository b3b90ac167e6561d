"""Augmentation presets: shapes, determinism from (seed, epoch, image_id), eval is fixed."""

import io

import numpy as np
import torch
from PIL import Image

from pipeline import augment, config


def _png(seed=0, size=(8, 8)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _batch(n=4):
    return {"image": np.array([_png(i) for i in range(n)], dtype=object), "label": np.arange(n),
            "image_id": np.array([f"id{i}" for i in range(n)], dtype=object)}


def test_train_actor_is_reproducible_and_varies_by_epoch():
    cfg = config.to_dict(config.load())["augment"]
    a = augment.AugmentBatch(cfg, 32, train=True, seed=1)
    b = augment.AugmentBatch(cfg, 32, train=True, seed=1)
    out_a, out_b = a(_batch()), b(_batch())
    assert out_a["image"].shape == (4, 3, 32, 32) and out_a["image"].dtype == np.uint8
    assert np.array_equal(out_a["image"], out_b["image"])  # same (seed, epoch, id) -> same pixels
    c = augment.AugmentBatch(cfg, 32, train=True, seed=2)
    assert not np.array_equal(out_a["image"], c(_batch())["image"])
    assert augment.sample_seed(1, 0, "id0") != augment.sample_seed(1, 1, "id0")


def test_eval_preset_is_deterministic_resize():
    cfg = config.load().augment
    img = augment.decode_tensor(_png())
    e = augment.EvalPreset(cfg, 32)
    assert torch.equal(e(img), e(img)) and e(img).shape == (3, 32, 32)
    cfg.preset = "imagenet"
    assert augment.EvalPreset(cfg, 24)(augment.decode_tensor(_png(size=(40, 60)))).shape == (3, 24, 24)


def test_imagenet_preset_options_build():
    cfg = config.load(None, ["augment.preset=imagenet", "augment.hflip=true", "augment.color_jitter=0.4",
                             "augment.auto_augment=trivial"]).augment
    out = augment.TrainPreset(cfg, 24)(augment.decode_tensor(_png(size=(50, 40))))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_to_input_normalizes():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = augment.to_input(x, [0.5] * 3, [0.5] * 3, torch.device("cpu"))
    assert y.dtype == torch.float32 and torch.allclose(y, torch.ones_like(y))
