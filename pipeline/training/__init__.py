"""Training: Ray Train ``TorchTrainer`` (DDP) fed by the Ray Data training stream.

- :mod:`~pipeline.training.driver`: ``imgpipe train`` on the driver (:func:`run`).
- :mod:`~pipeline.training.loop`: what every worker runs (``train_loop``,
  ``train_one_epoch``, ``evaluate``).
- :mod:`~pipeline.training.state`: what the driver hands the workers, the train state,
  and the checkpoint policy (``CheckpointSaver``).
- :mod:`~pipeline.training.progress`: metrics.jsonl, the heartbeat, the epoch line.
- :mod:`~pipeline.training.callbacks`: hooks for observers and tests (``train.callbacks``).
"""
