"""Shared fixtures: a real HTTP S3 endpoint (moto server on 127.0.0.1), a local Ray
instance sized like the CI machine, and small real datasets (scikit-learn digits)."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Dummy credentials for the moto server; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Sets AWS_ENDPOINT_URL so
    that Ray workers started afterwards (they inherit the environment) reach it too."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields ``s3://NAME``."""
    from pipeline import storage

    storage.configure(storage.StorageOptions(endpoint_url=s3_server))
    fs, _ = storage.filesystem("s3://x")
    name = f"test-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    yield f"s3://{name}"
    storage.configure(storage.StorageOptions())


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 logical CPUs: the CI machine's shape."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------ small datasets

PER_CLASS = 20  # digits per class in the shared test dataset (200 images)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """An ImageFolder of real digits PNGs: <class>/<id>.png, 20 per class."""
    from pipeline.data import digits

    root = tmp_path_factory.mktemp("bucket") / "images"
    digits.write_digits(str(root), limit=PER_CLASS)
    return str(root)


def small_config(**sections):
    """A fast config for tests: 2 epochs, small batches; ``sections`` override."""
    from pipeline import config

    data = {"train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5},
            "data": {"shard_rows": 24}, "ray": {"num_cpus": 2}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config.from_dict(data)


@pytest.fixture(scope="session")
def packed(digits_dir, ray_local, tmp_path_factory):
    """The digits packed into shards (several per split); yields the dataset URI."""
    from pipeline.data import packing

    dst = str(tmp_path_factory.mktemp("packed") / "shards")
    packing.pack(digits_dir, dst, small_config(), seed=0, quiet=True)
    return dst


@pytest.fixture(scope="session")
def trained(packed, tmp_path_factory):
    """One short training run on ``packed`` (2 DDP workers on 2 CPUs), with id traces
    (the :class:`tests.train_callbacks.TraceIds` callback)."""
    from pipeline.models import artifact
    from pipeline.training import driver
    from tests.train_callbacks import trace_ids

    runs = tmp_path_factory.mktemp("runs")
    trace = tmp_path_factory.mktemp("trace")
    cfg = small_config(data={"manifest": packed},
                       train={"storage": str(runs), "run_name": "t1", "callbacks": [trace_ids(str(trace))]})
    summary = driver.run(cfg, quiet=True)
    summary["trace_dir"] = str(trace)
    # read now: later tests resume run t1, and its checkpoint policy may prune this one
    final = os.path.join(summary["run_uri"], f"checkpoint_epoch_{cfg.train.epochs:04d}")
    summary["final_weights_sha256"] = artifact.read_meta(final)["weights_sha256"]
    summary["config"] = cfg
    return summary
