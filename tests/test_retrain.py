"""Nightly retraining over two simulated nights on the digits: new data, frozen holdout,
warm start, gate, incremental re-scoring, idempotent per date."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline import registry, storage
from pipeline.data import packing, shardset
from pipeline.errors import UserError
from pipeline.inference import predict
from pipeline.workflows import retrain
from tests.conftest import small_config


def _write(root, start, stop):
    """Digits [start, stop) as <class>/<i>.png under root (real images, disjoint ranges)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(start, stop):
        px = np.clip(np.rint(d.images[i] * 255 / 16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px, mode="L").save(buf, format="PNG")
        storage.write_bytes(os.path.join(root, str(d.target[i]), f"{i:04d}.png"), buf.getvalue())


@pytest.mark.timeout(900)
def test_two_nights(tmp_path, ray_local):
    base_imgs, incoming = tmp_path / "images", tmp_path / "incoming"
    _write(str(base_imgs), 0, 200)
    _write(str(incoming / "dt=2026-01-01"), 200, 300)
    _write(str(incoming / "dt=2026-01-02"), 300, 400)
    cfg = small_config(data={"incoming": str(incoming), "manifest": str(tmp_path / "base")},
                       train={"storage": str(tmp_path / "runs")},
                       registry={"uri": str(tmp_path / "reg")},
                       predict={"input": str(base_imgs), "output": str(tmp_path / "scores")})
    packing.pack(str(base_imgs), str(tmp_path / "base"), cfg, quiet=True)
    base = shardset.read_manifest(str(tmp_path / "base"))

    night1 = retrain.run(cfg, "2026-01-01", quiet=True)
    assert night1["promoted"] is True and night1["challenger"] == "digits@v1"  # no champion yet
    assert night1["warm_start"] is None
    assert night1["new_images"] == 100 and night1["train_images"] == base.rows("train") + 100
    assert night1["holdout_images"] == base.rows("test")
    assert night1["rescored"]["rows"] == 200

    night2 = retrain.run(cfg, "2026-01-02", quiet=True)
    assert night2["warm_start"] == "digits@v1" and night2["challenger"] == "digits@v2"
    assert night2["train_images"] == base.rows("train") + 200
    v2 = registry.show(cfg.registry.uri, "digits@v2")
    assert v2["parent"] == "digits@v1" and v2["gate"]["promoted"] == night2["promoted"]
    if night2["promoted"]:
        assert night2["challenger_holdout_accuracy"] > night2["champion_holdout_accuracy"]
    else:
        assert "champion kept" in night2["reason"]
    # the holdout stayed frozen: both nights' versions carry the base test shards
    for d in ("2026-01-01", "2026-01-02"):
        v = shardset.read_manifest(str(tmp_path / "base" / "versions" / f"dt={d}"))
        assert v.splits["test"] == [{**s, "path": str(tmp_path / "base" / s["path"])} for s in base.splits["test"]]

    again = retrain.run(cfg, "2026-01-02", quiet=True)
    assert again["already_done"] is True and "nothing changed" in again["message"]
    assert len(registry.list_versions(cfg.registry.uri, "digits")["versions"]) == 2

    # one row per stored image, scored by the champion
    t = predict.read_predictions(cfg.predict.output)
    srcs = t.column("source").to_pylist()
    assert len(srcs) == len(set(srcs)) == 200
    champ = registry.champion(cfg.registry.uri, "digits")["version"]
    assert set(t.column("model").to_pylist()) == {f"digits@v{champ}"}


def test_bad_dates_and_missing_settings(tmp_path):
    with pytest.raises(UserError, match="YYYY-MM-DD"):
        retrain.run(small_config(), "2026-13-01")
    with pytest.raises(UserError, match="data.manifest"):
        retrain.run(small_config(), "2026-01-01")
