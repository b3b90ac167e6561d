"""Evaluate: metrics from the shared inference path, and the per-image results file."""

import numpy as np
import pyarrow.parquet as pq

from pipeline.data import shardset
from pipeline.inference import evaluate
from tests.conftest import small_config

RESULT_COLUMNS = [("image_id", "string"), ("source", "string"), ("label", "int64"), ("predicted", "int64"),
                  ("score", "float"), ("label_score", "float")]


def test_evaluate_writes_per_image_results(trained, packed, tmp_path):
    uri = str(tmp_path / "report" / "test_predictions.parquet")
    out = evaluate.run(trained["best_checkpoint_uri"], packed, "test", small_config(), quiet=True,
                       predictions_uri=uri)
    assert out["predictions_uri"] == uri
    assert {"accuracy", "images", "per_class_accuracy", "confusion_matrix", "classes", "model", "model_uri",
            "data", "split", "data_manifest_sha256", "errors", "seconds"} <= set(out)
    t = pq.read_table(uri)
    assert [(f.name, str(f.type)) for f in t.schema] == RESULT_COLUMNS
    manifest = shardset.read_manifest(packed)
    assert t.num_rows == manifest.rows("test") == out["images"] and out["errors"] == 0
    assert len(set(t.column("image_id").to_pylist())) == t.num_rows
    label, predicted = t.column("label").to_numpy(), t.column("predicted").to_numpy()
    assert np.mean(label == predicted) == out["accuracy"]
    score, label_score = t.column("score").to_numpy(), t.column("label_score").to_numpy()
    assert ((score > 0) & (score <= 1)).all() and ((label_score >= 0) & (label_score <= score + 1e-6)).all()
    assert np.allclose(score[label == predicted], label_score[label == predicted])
    cm = np.array(out["confusion_matrix"])
    assert np.array_equal(cm, evaluate.confusion_matrix(label, predicted, len(manifest.classes)))


def test_confusion_metrics():
    cm = evaluate.confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    m = evaluate.metrics_from_confusion(cm, ["a", "b"])
    assert cm.tolist() == [[1, 1], [0, 2]] and m["accuracy"] == 0.75 and m["per_class_accuracy"] == {"a": 0.5, "b": 1.0}


def test_val_accuracy_booked_in_training_is_the_checkpoints(trained, packed):
    """Training scores val on both ranks (each its share, sums all-reduced); the figure
    it books for the best checkpoint is what evaluating that checkpoint on val gives."""
    out = evaluate.run(trained["best_checkpoint_uri"], packed, "val", small_config(), quiet=True)
    assert out["images"] == shardset.read_manifest(packed).rows("val")
    assert out["accuracy"] == trained["best_val_accuracy"]
