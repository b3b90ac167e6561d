"""imgpipe: image classification at cluster scale on Ray.

The package by layer, top to bottom (a module imports only from its own layer or
lower ones; ``tests/test_architecture.py`` enforces it; the full map is in
``docs/architecture.md``):

- ``cli`` (the ``imgpipe`` command), ``__main__`` (``python -m pipeline``);
- ``workflows`` (``demo``, nightly ``retrain``: cycles made of the stages below),
  ``submit`` (run a command as a Ray job on a cluster);
- ``training`` (the Ray Train driver and loop), ``inference`` (predict, evaluate:
  one decode + eval transform + model path), ``registry`` (model versions, aliases,
  the promotion gate), ``report`` (plots, HTML, TensorBoard);
- ``models`` (zoo, pretrained weights, the artifact folder format), ``transforms``
  (train/eval image transforms), ``data`` (listing, packing, shard sets, the training
  stream);
- ``ops`` (Ray runtime, preflight, watchdog), ``config`` (the typed YAML config);
- ``storage`` (the only module that talks to object storage), ``images`` (safe
  decoding); ``errors`` (exit-code error types), ``names`` (on-storage file names).
"""

__version__ = "0.1.0"
