"""Nightly retraining over two simulated nights on the digits: new data, frozen holdout,
warm start, gate, incremental re-scoring, idempotent per date."""

import io
import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cli, names, registry, storage
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


def _complete(partition):
    """The producer's completeness marker: dt=D/_SUCCESS."""
    storage.write_bytes(os.path.join(str(partition), names.PARTITION_COMPLETE), b"")


def _label_studio_export(images, dst):
    """A Label Studio JSON export labelling every PNG under ``images`` (<class>/<i>.png)."""
    tasks = [{"id": i, "data": {"image": str(p)},
              "annotations": [{"was_cancelled": False,
                               "result": [{"from_name": "choice", "to_name": "image", "type": "choices",
                                           "value": {"choices": [p.parent.name]}}]}]}
             for i, p in enumerate(sorted(images.rglob("*.png")))]
    storage.write_bytes(str(dst), json.dumps(tasks).encode())


@pytest.mark.slow  # 200 s in CI: two full nights (pack, train, gate, re-score)
@pytest.mark.timeout(900)
def test_two_nights(tmp_path, ray_local):
    base_imgs, incoming = tmp_path / "images", tmp_path / "incoming"
    _write(str(base_imgs), 0, 200)
    _write(str(incoming / "dt=2026-01-01"), 200, 300)
    # night 2 arrives as labels coming back from annotation: a Label Studio JSON export at the
    # top of the partition naming images stored elsewhere (the review -> label -> retrain loop)
    _write(str(tmp_path / "labelled"), 300, 400)
    _label_studio_export(tmp_path / "labelled", incoming / "dt=2026-01-02" / "export.json")
    _complete(incoming / "dt=2026-01-01")
    _complete(incoming / "dt=2026-01-02")
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
    assert night2["new_images"] == 100  # every annotated image of the export
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
    assert again["partition"]["files"] == 1  # the export

    # an image that lands in a trained night's partition is refused, not silently skipped
    _write(str(incoming / "dt=2026-01-01"), 400, 401)
    with pytest.raises(UserError, match=r"dt=2026-01-01 grew after it was trained on: 100 -> 101 files"):
        retrain.run(cfg, "2026-01-01", quiet=True)
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


def _tiny_base(tmp_path):
    """A base dataset with no shards: enough for the checks that run before any packing."""
    base = tmp_path / "base"
    storage.write_json(str(base / names.MANIFEST), {"format": 1, "classes": ["0", "1"],
                                                     "splits": {"train": [], "val": [], "test": []}})
    return base


def test_missing_marker_exits_2_and_records_nothing(tmp_path, capsys):
    base, incoming = _tiny_base(tmp_path), tmp_path / "incoming"
    _write(str(incoming / "dt=2026-01-01"), 0, 5)  # images, but the producer is not done
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"manifest": str(base), "incoming": str(incoming)}}))
    for date in ("2026-01-01", "2026-01-02"):  # a partial partition, and no partition at all
        rc = cli.main(["retrain", str(cfg), "--date", date])
        err = capsys.readouterr().err
        assert rc == 2, err
        marker = os.path.join(str(incoming), f"dt={date}", names.PARTITION_COMPLETE)
        assert f"dt={date} is not marked complete: no {marker}" in err
        assert not (base / "versions" / f"dt={date}" / names.RETRAIN_DONE).exists()


def test_partition_that_grows_after_its_night_is_refused(tmp_path):
    base, incoming = _tiny_base(tmp_path), tmp_path / "incoming"
    day = incoming / "dt=2026-01-01"
    _complete(day)  # an empty, complete day
    cfg = small_config(data={"manifest": str(base), "incoming": str(incoming)})
    first = retrain.run(cfg, "2026-01-01", quiet=True)
    assert first["outcome"] == "no new data" and first["partition"]["files"] == 0
    done = base / "versions" / "dt=2026-01-01" / names.RETRAIN_DONE
    recorded = done.read_bytes()
    again = retrain.run(cfg, "2026-01-01", quiet=True)
    assert again["already_done"] is True and "nothing changed" in again["message"]

    _write(str(day), 0, 2)  # late arrivals
    with pytest.raises(UserError) as e:
        retrain.run(cfg, "2026-01-01", quiet=True)
    assert "dt=2026-01-01 grew after it was trained on: 0 -> 2 files" in str(e.value)
    assert str(done) in str(e.value)
    assert done.read_bytes() == recorded  # nothing rewritten
    assert json.loads(recorded)["partition"]["files"] == 0


def test_partition_change_in_words(tmp_path):
    day = tmp_path / "dt=2026-01-01"
    _write(str(day), 0, 2)
    _complete(day)
    before = retrain.partition_state(str(day))
    assert before.files == 2 and before.change_from(before) is None  # the marker is not counted
    f = next(p for p in day.rglob("*.png"))
    f.write_bytes(f.read_bytes() + b"x")  # same count, other bytes
    change = retrain.partition_state(str(day)).change_from(before)
    assert change is not None and change.startswith("changed after it was trained on: 2 -> 2 files")
