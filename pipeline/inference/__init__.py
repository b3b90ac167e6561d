"""Scoring images with a trained model: the shared Ray Data stages (``actors``), batch
predictions into Parquet (``predict``) and evaluation of a packed split (``evaluate``)."""
