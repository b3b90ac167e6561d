"""Transforms: presets (shapes, determinism from (seed, epoch, image_id), eval is fixed) and
the one batched decoder (same pixels and EXIF behaviour as the CPU path)."""

import io

import numpy as np
import torch
from PIL import Image

from pipeline import config, images
from pipeline import transforms as augment


def _png(seed=0, size=(8, 8)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _batch(n=4, epoch=0):
    return {"image": np.array([_png(i) for i in range(n)], dtype=object), "label": np.arange(n),
            "image_id": np.array([f"id{i}" for i in range(n)], dtype=object),
            "epoch": np.full(n, epoch, dtype=np.int64)}


def test_train_actor_is_reproducible_and_varies_by_epoch():
    cfg = config.to_dict(config.load())["augment"]
    a = augment.AugmentBatch(cfg, 32, seed=1)
    b = augment.AugmentBatch(cfg, 32, seed=1)
    out_a, out_b = a(_batch()), b(_batch())
    assert out_a["image"].shape == (4, 3, 32, 32) and out_a["image"].dtype == np.uint8
    assert np.array_equal(out_a["image"], out_b["image"])  # same (seed, epoch, id) -> same pixels
    c = augment.AugmentBatch(cfg, 32, seed=2)
    assert not np.array_equal(out_a["image"], c(_batch())["image"])
    assert not np.array_equal(out_a["image"], a(_batch(epoch=1))["image"])  # the row's epoch seeds it
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


def _jpeg(seed=0, size=(40, 48), mode="RGB", orientation=None):
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode in ("RGB", "CMYK") else size
    im = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode="RGB" if mode == "CMYK" else mode)
    if mode == "CMYK":
        im = im.convert("CMYK")
    buf = io.BytesIO()
    kwargs = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def test_worker_decode_matches_the_careful_decoder():
    """Batched decode_jpeg (nvJPEG on a GPU, libjpeg-turbo here) for plain RGB/grey JPEGs;
    PNG, CMYK and EXIF-rotated JPEGs take the PIL path: every image decodes as the
    actor path would decode it."""
    blobs = [_jpeg(0), _jpeg(1, mode="L"), _png(2), _jpeg(3, mode="CMYK"), _jpeg(4, orientation=6)]
    assert [augment.plain_jpeg(b) for b in blobs] == [True, True, False, False, False]
    w = augment.WorkerAugment(config.load().augment, 32, seed=0, device=torch.device("cpu"))
    for got, blob in zip(w.decode(blobs), blobs):
        want = augment.decode_tensor(blob)
        assert got.shape == want.shape and got.dtype == torch.uint8
        assert (got.int() - want.int()).abs().max() <= 2  # two JPEG decoders may round differently
    assert w.decode([blobs[4]])[0].shape == (3, 48, 40)  # orientation 6: rotated upright


def test_worker_augment_is_reproducible_from_seed_epoch_id():
    cfg = config.load(None, ["augment.preset=imagenet", "augment.hflip=true"]).augment
    w = augment.WorkerAugment(cfg, 24, seed=5, device=torch.device("cpu"))
    blobs = np.array([_jpeg(i) for i in range(3)], dtype=object)
    ids = np.array(["a", "b", "c"], dtype=object)
    out = w(blobs, ids, epoch=0)
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.uint8
    assert torch.equal(out, w(blobs, ids, epoch=0))
    assert not torch.equal(out, w(blobs, ids, epoch=1))
    assert torch.equal(out[1], w(blobs[1:2], ids[1:2], epoch=0)[0])  # independent of the batch around it


def _rgb_png(seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_batch_matches_the_cpu_path_with_exif():
    """decode_batch is the one batched decoder (training workers and model actors): a plain
    JPEG goes through decode_jpeg (run here on CPU, the same call as nvJPEG on a GPU);
    EXIF orientation 6 and 3, PNG: the CPU path's pixels, upright, within 2 levels."""
    blobs = [_jpeg(0), _jpeg(1, orientation=6), _jpeg(2, orientation=3), _rgb_png(3), b"", b"\xff\xd8\xff\xe0" + b"\x00" * 50]
    got = augment.decode_batch(blobs, "cpu")
    for img, blob in zip(got[:4], blobs[:4]):
        want = augment.decode_tensor(blob)
        assert isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.shape == want.shape
        assert (img.int() - want.int()).abs().max() <= 2
    assert got[1].shape == (3, 48, 40) and got[2].shape == (3, 40, 48)  # 6: rotated upright; 3: turned
    assert [e.reason for e in got[4:]] == ["empty", "not_an_image"]


def test_decode_batch_survives_a_truncated_jpeg_in_the_batch():
    """One truncated JPEG fails decode_jpeg's batch call: every image then takes the CPU
    path, so the good ones still decode and the bad one gets the CPU path's reason."""
    good, full = _jpeg(0), _jpeg(1)
    cut = full[: len(full) // 2]
    assert augment.plain_jpeg(cut)  # the header is fine: only decoding finds out
    got = augment.decode_batch([good, cut], torch.device("cpu"))
    assert torch.equal(got[0], augment.decode_tensor(good))
    assert isinstance(got[1], images.ImageError) and got[1].reason == "truncated"


def test_eval_transform_on_device_matches_one():
    cfg = config.load(None, ["augment.preset=imagenet"]).augment
    t = augment.EvalTransform(cfg, 24)
    blobs = [_jpeg(0), _jpeg(1, orientation=6), _rgb_png(2), b"junk"]
    out, errors = t.on_device(blobs, torch.device("cpu"))
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.uint8
    assert errors[:3] == ["", "", ""] and errors[3].startswith("not_an_image: ")
    for i in range(3):
        assert (out[i].int() - torch.from_numpy(t.one(blobs[i])).int()).abs().max() <= 2
