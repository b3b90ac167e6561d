"""The report package's entry points, for the stages that write reports (training, predict).

Each lives in the module that owns it:

- :func:`write_train_report`, :func:`read_history`: :mod:`pipeline.report.train_report`;
- :func:`write_predict_report`: :mod:`pipeline.report.predict_report`;
- :func:`write_tensorboard`: :mod:`pipeline.report.tensorboard_events`.
"""

from __future__ import annotations

from pipeline.report.predict_report import SCORE_BINS, write_predict_report
from pipeline.report.tensorboard_events import write_tensorboard
from pipeline.report.train_report import read_history, write_train_report

__all__ = ["SCORE_BINS", "read_history", "write_predict_report", "write_tensorboard", "write_train_report"]
