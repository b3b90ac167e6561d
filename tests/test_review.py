"""The annotation queue (issue 17): ``imgpipe review`` writes the least sure images as Label
Studio tasks and a CSV; labels coming back (CSV ``uri,label`` or a Label Studio export) pack.

The predictions folder is written here in the committed ``imgpipe predict`` format
(docs/design.md: ``part-*.parquet`` + ``_SUCCESS`` listing them) with chosen scores, so the
expected order is known without training a model."""

import csv
import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import packing, shardset
from pipeline.errors import UserError
from pipeline.inference.tasks import PRED_SCHEMA
from pipeline.workflows import review
from tests.conftest import small_config

# Label Studio's import task format, as far as review fills it
TASK_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object", "required": ["data", "predictions"],
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
            "predictions": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["result"],
                "properties": {"model_version": {"type": "string"}, "score": {"type": "number"},
                               "result": {"type": "array", "minItems": 1, "items": {
                                   "type": "object", "required": ["from_name", "to_name", "type", "value"],
                                   "properties": {"type": {"const": "choices"},
                                                  "value": {"type": "object", "required": ["choices"],
                                                            "properties": {"choices": {
                                                                "type": "array", "minItems": 1,
                                                                "items": {"type": "string"}}}}}}}}}},
        },
    },
}


@pytest.fixture(scope="module")
def predictions(digits_dir, tmp_path_factory):
    """A committed predictions folder over 40 digits: top-1 score falls with the row number."""
    dst = tmp_path_factory.mktemp("pred") / "out"
    dst.mkdir()
    # by file name (the digit's index in the set): classes interleave
    sources = sorted((os.path.join(r, f) for r, _, fs in os.walk(digits_dir) for f in fs), key=os.path.basename)[:40]
    rows = []
    for i, src in enumerate(sources):
        truth = int(os.path.basename(os.path.dirname(src)))
        p1 = 0.99 - i * 0.012  # row 39 is the least sure
        other = (truth + 1) % 10
        rows.append({"image_id": f"{i:064x}", "source": src, "label": truth, "label_name": str(truth),
                     "score": p1, "topk_labels": [truth, other], "topk_scores": [p1, (1 - p1) * 0.9],
                     "model": "digits@v1", "run_id": "r1", "topk_label_names": [str(truth), str(other)]})
    for n in range(2):
        pq.write_table(pa.Table.from_pylist(rows[n * 20:(n + 1) * 20], schema=PRED_SCHEMA), dst / f"part-{n}.parquet")
    (dst / "_SUCCESS").write_text(json.dumps({"format": 2, "rows": 40, "files": ["part-0.parquet", "part-1.parquet"]}))
    return str(dst), sources


def _review(pred, out, *extra):
    p = subprocess.run([sys.executable, "-m", "pipeline", "--quiet", "review", "--predictions", pred,
                        "--output", out, *extra], capture_output=True, text=True, timeout=300)
    return p


def test_review_writes_label_studio_tasks_and_csv(predictions, tmp_path):
    pred, sources = predictions
    out = str(tmp_path / "queue.json")
    p = _review(pred, out, "--k", "5", "--strategy", "least-confident")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    tasks = json.load(open(out))
    jsonschema.validate(tasks, TASK_SCHEMA)
    assert [t["data"]["image"] for t in tasks] == sources[39:34:-1]  # least sure first
    assert tasks[0]["predictions"][0]["model_version"] == "digits@v1"
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["uri", "predicted", "score"] and [r["uri"] for r in rows] == sources[39:34:-1]
    assert float(rows[0]["score"]) == pytest.approx(0.99 - 39 * 0.012, abs=1e-5)


@pytest.mark.parametrize("strategy", ["margin", "entropy"])
def test_strategies_rank_the_least_sure_first(predictions, tmp_path, strategy):
    pred, sources = predictions
    out = str(tmp_path / "q.json")
    review.run(pred, 3, strategy, out, str(tmp_path / "q.csv"))  # the command's handler, in-process
    assert [t["data"]["image"] for t in json.load(open(out))] == sources[39:36:-1]


def test_bad_k_is_refused(predictions, tmp_path):
    with pytest.raises(UserError, match="--k"):
        review.run(predictions[0], 0, "margin", str(tmp_path / "q.json"))


def test_labels_come_back_as_csv_and_label_studio_export(predictions, tmp_path, ray_local):
    pred, _ = predictions
    out = str(tmp_path / "queue.json")
    assert _review(pred, out, "--k", "20").returncode == 0
    tasks = json.load(open(out))
    truth = {t["data"]["image"]: os.path.basename(os.path.dirname(t["data"]["image"])) for t in tasks}
    # an annotator's CSV: the queue's CSV with the predicted column corrected into labels
    labelled = tmp_path / "labels.csv"
    with open(out + ".csv") as f, open(labelled, "w") as g:
        g.write("uri,label\n" + "".join(f"{r['uri']},{truth[r['uri']]}\n" for r in csv.DictReader(f)))
    # a Label Studio export: the tasks, each with an annotation (one cancelled, one unlabelled)
    export = []
    for n, t in enumerate(tasks):
        ann = [{"was_cancelled": False, "result": [{"from_name": "choice", "to_name": "image", "type": "choices",
                                                   "value": {"choices": [truth[t["data"]["image"]]]}}]}]
        if n == 0:  # a cancelled annotation with another label does not count
            wrong = "9" if truth[t["data"]["image"]] != "9" else "8"
            ann.insert(0, {"was_cancelled": True, "result": [{"value": {"choices": [wrong]}}]})
        export.append({**t, "annotations": ann if n != 1 else []})
    (tmp_path / "export.json").write_text(json.dumps(export))
    for listing, expected in ((labelled, truth), (tmp_path / "export.json",
                                                 {k: v for k, v in truth.items() if k != tasks[1]["data"]["image"]})):
        dst = str(tmp_path / f"ds-{listing.stem}")
        packing.pack(str(listing), dst, small_config(data={"val_fraction": 0.0, "test_fraction": 0.0}), quiet=True)
        m = shardset.read_manifest(dst)
        got = {r["source"]: m.classes[r["label"]] for s in m.splits for t in shardset.iter_split(m, s)
               for r in t.select(["source", "label"]).to_pylist()}
        assert got == expected
    assert np.unique(list(truth.values())).size >= 2
