"""imgpipe: image classification at cluster scale on Ray.

Modules, one concern each: ``config`` (YAML config + overrides), ``storage``
(the only module that talks to object storage), ``images`` (safe decoding),
``shards`` (pack + manifest), ``augment`` (train/eval presets, Ray Data actors),
``models`` (model zoo), ``train`` (Ray Train loop), ``predict`` (batch inference),
``registry`` (model versions and aliases), ``demo`` (the embedded default cycle),
``cli`` (the ``imgpipe`` command).
"""

__version__ = "0.1.0"
