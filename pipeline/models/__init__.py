"""Models: ``zoo`` (architectures by name), ``pretrained`` (named pretrained weights),
``artifact`` (the weights + meta folder shared by checkpoints, the registry and predict)."""
