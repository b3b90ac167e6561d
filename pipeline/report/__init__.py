"""Human-readable reports of training runs and predictions (below training and inference).

Module map:

- ``report``: the entry points callers import (re-exported from the modules below);
- ``train_report``: ``RUN/metrics.jsonl`` + evaluate's results -> ``RUN/report.html``,
  ``RUN/report/*.png``, ``RUN/report/report.json``; the one reader of ``metrics.jsonl``;
- ``mistakes``: the most confident mistakes, from evaluate's per-image Parquet results
  (the report never scores images) and their thumbnails from the dataset's shards;
- ``predict_report``: a committed ``imgpipe predict`` output -> ``DST/_report/``;
- ``plots``: matplotlib (Agg) figures as PNG bytes;
- ``pages`` + ``templates/``: Jinja2 HTML with autoescaping, plots embedded as data URIs;
- ``outputs``: the report folder's PNG files and ``report.json``;
- ``tensorboard_events``: per-epoch scalars as TensorBoard event files (tensorboardX).
"""
