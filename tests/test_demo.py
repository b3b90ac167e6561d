"""The demo cycle at small size on local Ray, end to end."""

import json
import os

import pyarrow.parquet as pq

from pipeline import registry
from pipeline.workflows import demo
from tests.conftest import small_config


def test_demo_small_cycle(tmp_path, ray_local):
    cfg = small_config(data={"shard_rows": 0})
    s = demo.run(str(tmp_path / "wd"), cfg, quiet=True, per_class=15)
    keys = {"test_accuracy", "train_images", "val_images", "test_images", "predictions_uri", "predictions_rows",
            "model", "model_uri", "registry_uri", "seconds", "train_images_per_second", "predict_images_per_second"}
    assert keys <= set(s)
    assert (s["train_images"], s["val_images"], s["test_images"]) == (110, 20, 20)
    assert s["predictions_rows"] == s["test_images"]
    assert s["model"] == "digits@v1" and s["promoted"] is True
    assert registry.champion(s["registry_uri"], "digits")["version"] == 1
    # the predictions were made from the PNG files, not the shards
    t = pq.read_table(os.path.join(s["predictions_uri"], sorted(
        f for f in os.listdir(s["predictions_uri"]) if f.startswith("part-"))[0]))
    assert all(src.endswith(".png") and "/bucket/images/" in src for src in t.column("source").to_pylist())
    assert os.path.exists(os.path.join(s["predictions_uri"], "_SUCCESS"))
    assert 0.0 <= s["test_accuracy"] <= 1.0
    # the run report: numbers match the run
    assert s["report"].endswith("report.html") and os.path.exists(s["report"])
    rep = json.load(open(os.path.join(os.path.dirname(s["report"]), "report", "report.json")))
    assert rep["evaluation"]["confusion_sum"] == s["test_images"]
    assert abs(rep["evaluation"]["confusion_trace"] / s["test_images"] - s["test_accuracy"]) < 1e-9
    hist = [json.loads(x) for x in open(os.path.join(s["run_uri"], "metrics.jsonl"))]
    assert rep["final_val_accuracy"] == hist[-1]["val_accuracy"]
    assert os.path.exists(os.path.join(s["predictions_uri"], "_report", "report.html"))
