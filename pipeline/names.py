"""Names of the files and folders imgpipe writes to storage, defined once.

Every reader and writer of these takes the name from here; the layouts they make up
are described in ``docs/formats.md``.
"""

# datasets (imgpipe pack)
MANIFEST = "manifest.json"  # written last: its presence commits the dataset
ERRORS_DIR = "_errors"  # quarantined images: <dataset or output>/_errors/*.parquet
DATASET_REPORT_DIR = "_report"  # DST/_report/: the audit page (pack, imgpipe audit) and its plots
DATASET_REPORT = "dataset.html"  # DST/_report/dataset.html
DATASET_AUDIT = "audit.json"  # DST/_report/: the audit `imgpipe audit` re-ran (manifest.json is never rewritten)
LABEL_ISSUES = "label_issues.parquet"  # DST/_report/: suspected label errors (imgpipe audit --model)

# training runs (RUN = train.storage/<run_name>)
RUN_CONFIG = "config.yaml"  # the resolved config of the run
RUN_DATASET = "dataset.json"  # the dataset a run trains on: manifest URI and sha256; a resume must match
METRICS = "metrics.jsonl"  # one JSON object per finished epoch
HEARTBEAT = "_heartbeat.json"  # rank 0's progress inside an epoch, for stall detection
TRAIN_STATE = "train_state.pt"  # optimizer, step, data position: the resume state of a checkpoint
TENSORBOARD_DIR = "tensorboard"
REPORT_DIR = "report"  # RUN/report/: plots and report.json
EVAL_PREDICTIONS = "test_predictions.parquet"  # RUN/report/: evaluate's per-image results

# model artifacts (checkpoint folders and registry versions)
WEIGHTS = "weights.pt"
META = "meta.json"

# registry
ALIASES = "aliases.json"

# predictions (imgpipe predict)
SUCCESS = "_SUCCESS"  # the commit marker: lists the committed part files
STATE_DIR = "_state"  # the input listing snapshot and run state
PREDICT_REPORT_DIR = "_report"
# predict's own tables (DST/_state/*, DST/_errors/*) are Parquet files whose names do not end in
# ".parquet", so that readers' 'DST/*.parquet' and 'DST/**/*.parquet' globs reach only predictions
PREDICT_SIDE_TABLE = ".pq"  # suffix of DST/_errors/part-<h>.pq (source, image_id, error)
PREDICT_LISTING = "listing.pq"  # DST/_state/: the input listing snapshot of the current attempt
PREDICT_COMMITTED_LISTING = "committed_listing.pq"  # DST/_state/: the listing of the last commit
PREDICT_REMAINING = "remaining.pq"  # DST/_state/: the listing less what an attempt skips (rewritten each run)
PREDICT_ATTEMPT = "attempt.json"  # DST/_state/: the current attempt (run id, model, input, committed)

# leases (pipeline.ops.lease): one live run per output folder, dataset or training run
LEASE = "_lease.json"  # <folder>/_lease.json: owner, heartbeat, expiry; deleted when the run ends
# (local disk also keeps an empty "_lease.json.lock" next to it: the flock file of storage's
# conditional writes)

# learning curves (imgpipe learning-curve --output OUT)
LEARNING_CURVE = "learning_curve.json"  # OUT/: points, per-fraction means, the power-law fit, estimates
LEARNING_CURVE_PLOT = "learning_curve.png"  # OUT/: test accuracy vs images per class, with the fit

# reports
HTML_NAME = "report.html"
JSON_NAME = "report.json"

# nightly retraining
RETRAIN_DONE = "retrain.json"
PARTITION_COMPLETE = "_SUCCESS"  # data.incoming/dt=D/_SUCCESS: written by producers once dt=D is complete
