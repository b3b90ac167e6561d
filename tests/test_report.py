"""pipeline.report: training and prediction reports, on tiny fake run, evaluation and prediction folders (no Ray)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import names, storage
from pipeline.data import shardset
from pipeline.errors import UserError
from pipeline.inference.evaluate import RESULT_SCHEMA, metrics_from_confusion
from pipeline.inference.predict import ERROR_SCHEMA, PRED_SCHEMA
from pipeline.report import mistakes, report

CLASSES = ["a", "b", "c"]
HISTORY = [
    {"epoch": 1, "step": 10, "train_loss": 1.05, "train_accuracy": 0.45, "val_loss": 0.98, "val_accuracy": 0.50,
     "best_val_accuracy": 0.50, "lr": 0.05, "train_images": 300, "val_images": 40,
     "images_per_second": 850.0, "epoch_seconds": 0.353},
    {"epoch": 2, "step": 20, "train_loss": 0.71, "train_accuracy": 0.70, "val_loss": 0.66, "val_accuracy": 0.725,
     "best_val_accuracy": 0.725, "lr": 0.1, "train_images": 300, "val_images": 40,
     "images_per_second": 910.0, "epoch_seconds": 0.330},
    {"epoch": 3, "step": 30, "train_loss": 0.42, "train_accuracy": 0.86, "val_loss": 0.47, "val_accuracy": 0.85,
     "best_val_accuracy": 0.85, "lr": 0.01, "train_images": 300, "val_images": 40,
     "images_per_second": 905.5, "epoch_seconds": 0.331},
]
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def _png_bytes(label: int, i: int) -> bytes:
    arr = np.zeros((12, 12, 3), dtype=np.uint8)
    arr[:, :] = COLORS[label]
    arr[i % 12, :] = 255  # make every image distinct
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_dataset(root: str, n: int = 12) -> list[tuple[str, int]]:
    """A packed dataset with one test shard of ``n`` PNGs; returns (source, label) rows."""
    blobs = [_png_bytes(i % 3, i) for i in range(n)]
    rows = [(f"mem://img/{CLASSES[i % 3]}/{i}.png", i % 3) for i in range(n)]
    table = pa.table({"image_id": [hashlib.sha256(b).hexdigest() for b in blobs], "image": blobs,
                      "label": pa.array([lab for _, lab in rows], pa.int32()),
                      "source": [s for s, _ in rows]}, schema=shardset.SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none")
    data = buf.getvalue()
    storage.write_bytes(storage.join(root, "test", "part-00000.parquet"), data)
    storage.write_json(storage.join(root, shardset.MANIFEST), {
        "format": 1, "classes": CLASSES, "source": "mem://img", "created": "2024-01-01T00:00:00Z",
        "splits": {"train": [], "val": [],
                   "test": [{"path": "test/part-00000.parquet", "rows": n,
                             "sha256": hashlib.sha256(data).hexdigest()}]}})
    return rows


WRONG = {3: (1, 0.8), 5: (0, 0.9)}  # dataset row -> (predicted class, its score): the fixture's two mistakes


def _write_per_image(uri: str, rows: list[tuple[str, str, int, int, float]]) -> None:
    """evaluate's per-image results: (image_id, source, label, predicted, score) rows."""
    storage.write_table(uri, pa.table({
        "image_id": [r[0] for r in rows], "source": [r[1] for r in rows], "label": [r[2] for r in rows],
        "predicted": [r[3] for r in rows], "score": [r[4] for r in rows],
        "label_score": [r[4] if r[2] == r[3] else 1.0 - r[4] for r in rows]}, schema=RESULT_SCHEMA))


@pytest.fixture
def run_folder(tmp_path):
    run = str(tmp_path / "run")
    storage.write_bytes(os.path.join(run, "metrics.jsonl"),
                        "".join(json.dumps(h) + "\n" for h in HISTORY).encode())
    storage.write_bytes(os.path.join(run, "config.yaml"), b"train:\n  epochs: 3\n")
    data_uri = str(tmp_path / "data")
    rows = _write_dataset(data_uri)
    ids = _dataset_ids(data_uri)
    preds_uri = str(tmp_path / "eval" / names.EVAL_PREDICTIONS)
    _write_per_image(preds_uri, [(ids[i], s, lab, *WRONG.get(i, (lab, 0.95))) for i, (s, lab) in enumerate(rows)])
    cm = np.array([[3, 1, 0], [0, 4, 0], [1, 0, 3]])  # the same two mistakes: a -> b, c -> a
    evaluation = metrics_from_confusion(cm, CLASSES)
    evaluation.update({"model": "digits@v1", "split": "test", "errors": 0, "predictions_uri": preds_uri})
    return run, data_uri, rows, evaluation


def _dataset_ids(data_uri: str) -> list[str]:
    manifest = shardset.read_manifest(data_uri)
    return [i for t in shardset.iter_split(manifest, "test", columns=["image_id"]) for i in t["image_id"].to_pylist()]


def _check_pngs(folder: str, names: list[str]) -> None:
    assert names
    for name in names:
        with Image.open(os.path.join(folder, name)) as img:
            img.verify()
        with Image.open(os.path.join(folder, name)) as img:
            assert img.format == "PNG"
            assert img.size[0] > 100 and img.size[1] > 100, (name, img.size)


def _check_self_contained(html_path: str) -> str:
    text = open(html_path, encoding="utf-8").read()
    assert "data:image/png;base64," in text
    assert 'src="http' not in text and "src='http" not in text
    assert "<script" not in text and "<link" not in text
    return text


def test_train_report_full(run_folder):
    run, data_uri, rows, evaluation = run_folder
    uri = report.write_train_report(run, evaluation=evaluation, data_uri=data_uri)
    assert uri == os.path.join(run, "report.html")
    text = _check_self_contained(uri)
    rep = json.load(open(os.path.join(run, "report", "report.json")))
    assert set(rep["plots"]) == {"loss.png", "accuracy.png", "lr.png", "throughput.png", "confusion.png",
                                 "per_class_accuracy.png", "misclassified.png"}
    _check_pngs(os.path.join(run, "report"), rep["plots"])
    assert text.count("data:image/png;base64,") == len(rep["plots"])

    last = json.loads(open(os.path.join(run, "metrics.jsonl")).read().splitlines()[-1])
    assert rep["final_val_accuracy"] == last["val_accuracy"]
    assert rep["history"]["val_accuracy"][-1] == last["val_accuracy"]
    assert rep["history"]["train_loss"] == [h["train_loss"] for h in HISTORY]

    ev = rep["evaluation"]
    assert ev["confusion_sum"] == evaluation["images"] == 12
    assert ev["confusion_trace"] == round(evaluation["accuracy"] * evaluation["images"]) == 10
    assert ev["per_class_accuracy"] == evaluation["per_class_accuracy"]

    truth = {s: CLASSES[lab] for s, lab in rows}
    check, mis = rep["model_check"], rep["misclassified"]
    assert check["images"] == len(rows) and check["correct"] + check["wrong"] == len(rows)
    assert check["correct"] == ev["confusion_trace"] and check["predictions_uri"] == evaluation["predictions_uri"]
    assert mis, "the per-image results hold two mistakes"
    assert len(mis) == min(16, check["wrong"]) == len(WRONG)
    for m in mis:
        assert m["true"] == truth[m["source"]] and m["pred"] != m["true"]
        assert 0.0 < m["prob"] <= 1.0
    probs = [m["prob"] for m in mis]
    assert probs == sorted(probs, reverse=True) == [0.9, 0.8]
    assert [m["source"] for m in mis] == [rows[5][0], rows[3][0]]
    for m in mis:
        assert m["source"] in text


def test_mistakes_ranked_by_score_and_limited(tmp_path):
    """The most confident mistakes: highest score first, ties by source, at most `worst` (16 by default)."""
    uri = str(tmp_path / names.EVAL_PREDICTIONS)
    scores = [round(0.30 + 0.02 * (i % 25), 2) for i in range(40)]
    rows = [(f"id{i}", f"/img/{i:02d}.png", i % 3, (i + 1) % 3 if i % 4 else i % 3, scores[i]) for i in range(40)]
    _write_per_image(uri, rows)
    wrong = [r for r in rows if r[2] != r[3]]
    full = mistakes.find_mistakes(uri, CLASSES, "test", worst=100)
    top = mistakes.find_mistakes(uri, CLASSES, "test", worst=2)
    assert [m["source"] for m in top.shown] == [m["source"] for m in full.shown[:2]]
    assert full.images == 40 and full.wrong == len(wrong) == 30 and full.correct == 10
    expected = sorted(wrong, key=lambda r: (-np.float32(r[4]), r[1]))
    assert [m["source"] for m in full.shown] == [r[1] for r in expected]
    assert full.image_ids == [r[0] for r in expected]
    assert [m["prob"] for m in full.shown] == [round(float(np.float32(r[4])), 6) for r in expected]
    assert len(mistakes.find_mistakes(uri, CLASSES, "test").shown) == mistakes.WORST == 16


def test_mistakes_thumbnails_come_from_the_shards(run_folder):
    _, data_uri, _, _ = run_folder
    manifest = shardset.read_manifest(data_uri)
    table = next(shardset.iter_split(manifest, "test", columns=["image_id", "image"]))
    ids, blobs = table["image_id"].to_pylist(), table["image"].to_pylist()
    found = mistakes.read_images(data_uri, "test", [ids[3], ids[5], "not-in-the-dataset"])
    assert found == {ids[3]: blobs[3], ids[5]: blobs[5]}


def test_train_report_mistakes_without_dataset(run_folder):
    """Without the dataset the mistakes are listed but not drawn, and the page says why."""
    run, _, rows, evaluation = run_folder
    text = _check_self_contained(report.write_train_report(run, evaluation=evaluation))
    rep = json.load(open(os.path.join(run, "report", "report.json")))
    assert "misclassified.png" not in rep["plots"] and len(rep["misclassified"]) == len(WRONG)
    assert "Thumbnails need the dataset" in text and rows[5][0] in text


def test_train_report_escapes_html(run_folder):
    run, data_uri, _, evaluation = run_folder
    storage.write_bytes(os.path.join(run, "config.yaml"), b'name: "<script>alert(1)</script> & <b>"\n')
    text = _check_self_contained(report.write_train_report(run, evaluation=evaluation, data_uri=data_uri))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in text


def test_train_report_metrics_only(run_folder):
    run, data_uri, _, evaluation = run_folder
    report.write_train_report(run, evaluation=evaluation, data_uri=data_uri)
    uri = report.write_train_report(run)  # a later, smaller report drops the plots it no longer draws
    _check_self_contained(uri)
    rep = json.load(open(os.path.join(run, "report", "report.json")))
    assert rep["plots"] == ["loss.png", "accuracy.png", "lr.png", "throughput.png"]
    assert rep["evaluation"] is None and rep["misclassified"] is None
    _check_pngs(os.path.join(run, "report"), rep["plots"])
    assert sorted(os.listdir(os.path.join(run, "report"))) == sorted([*rep["plots"], "report.json"])


def test_train_report_needs_metrics(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl"):
        report.write_train_report(str(tmp_path / "nothing"))


def _pred_table(names: list[str], scores: list[float]) -> pa.Table:
    n = len(names)
    return pa.table({
        "image_id": [f"id{i}" for i in range(n)], "source": [f"/img/{names[i]}/{i}.png" for i in range(n)],
        "label": pa.array([CLASSES.index(x) if x in CLASSES else 9 for x in names], pa.int32()),
        "label_name": names, "score": pa.array(scores, pa.float32()),
        "topk_labels": [[0]] * n, "topk_scores": [[s] for s in scores],
        "model": ["m@v1"] * n, "run_id": ["r1"] * n, "topk_label_names": [[CLASSES[0]]] * n}, schema=PRED_SCHEMA)


def _write_pq(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def test_predict_report(tmp_path):
    dst = str(tmp_path / "preds")
    _write_pq(os.path.join(dst, "part-1.parquet"), _pred_table(["a", "a", "b"], [0.99, 0.42, 0.7]))
    _write_pq(os.path.join(dst, "part-2.parquet"), _pred_table(["c", "a", "b", "b"], [1.0, 0.05, 0.55, 0.97]))
    _write_pq(os.path.join(dst, "part-orphan.parquet"), _pred_table(["zzz"] * 50, [0.5] * 50))
    _write_pq(os.path.join(dst, "_errors", "part-1.parquet"), pa.table({
        "source": ["/x/1.jpg", "/x/2.jpg", "/x/3.jpg"], "image_id": ["", "h2", "h3"],
        "error": ["missing: not found: /x/1.jpg", "decode: cannot identify image", "decode: truncated"]},
        schema=ERROR_SCHEMA))
    storage.write_json(os.path.join(dst, "_SUCCESS"), {
        "rows": 7, "errors": 3, "files": ["part-1.parquet", "part-2.parquet"],
        "error_files": ["_errors/part-1.parquet"], "model": "m@v1", "run_id": "r1"})
    uri = report.write_predict_report(dst)
    assert uri == os.path.join(dst, "_report", "report.html")
    _check_self_contained(uri)
    rep = json.load(open(os.path.join(dst, "_report", "report.json")))
    assert rep["rows"] == 7 and rep["errors"] == 3
    assert rep["counts_by_class"] == {"a": 3, "b": 3, "c": 1}  # the orphan's "zzz" rows are ignored
    assert rep["errors_by_reason"] == {"decode": 2, "missing": 1}
    hist = rep["score_histogram"]
    assert len(hist["bins"]) == len(hist["counts"]) + 1 == report.SCORE_BINS + 1
    assert sum(hist["counts"]) == 7
    assert hist["counts"][-1] == 3  # 0.97, 0.99 and 1.0 fall in the last bin, [0.95, 1.0]
    assert hist["counts"][1] == 1  # 0.05
    assert rep["mean_score_by_class"]["b"] == pytest.approx((0.7 + 0.55 + 0.97) / 3, rel=1e-5)
    assert set(rep["plots"]) == {"class_distribution.png", "score_histogram.png", "errors.png"}
    _check_pngs(os.path.join(dst, "_report"), rep["plots"])


def test_predict_report_no_errors_and_uncommitted(tmp_path):
    dst = str(tmp_path / "preds")
    _write_pq(os.path.join(dst, "part-1.parquet"), _pred_table(["a", "b"], [0.9, 0.8]))
    with pytest.raises(UserError, match="_SUCCESS"):
        report.write_predict_report(dst)
    model_uri = str(tmp_path / "model")
    storage.write_json(os.path.join(model_uri, "meta.json"), {"arch": "smallcnn", "classes": CLASSES})
    storage.write_json(os.path.join(dst, "_SUCCESS"), {"rows": 2, "errors": 0, "files": ["part-1.parquet"],
                                                       "error_files": [], "model": "m@v1",
                                                       "model_uri": model_uri})
    report.write_predict_report(dst)
    rep = json.load(open(os.path.join(dst, "_report", "report.json")))
    assert rep["counts_by_class"] == {"a": 1, "b": 1, "c": 0}  # the model's classes, never-predicted too
    assert rep["errors"] == 0 and rep["errors_by_reason"] == {}
    assert "errors.png" in rep["plots"]  # a text note instead of bars
    _check_pngs(os.path.join(dst, "_report"), rep["plots"])


def test_tensorboard(tmp_path):
    run = str(tmp_path / "run")
    report.write_tensorboard(run, HISTORY)
    report.write_tensorboard(run, HISTORY)  # rewriting replaces, does not append
    events = os.listdir(os.path.join(run, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    assert os.path.getsize(os.path.join(run, "tensorboard", events[0])) > 100
    scalars = _read_scalars(os.path.join(run, "tensorboard", events[0]))
    assert [v for _, v in scalars["accuracy/val"]] == pytest.approx([h["val_accuracy"] for h in HISTORY])
    assert [step for step, _ in scalars["loss/train"]] == [1, 2, 3]
    assert "lr" in scalars and "throughput/images_per_second" in scalars


def _read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
    """Parse a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_skips_s3():
    assert report.write_tensorboard("s3://bucket/runs/x", HISTORY) is None
