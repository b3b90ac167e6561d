"""Config: defaults, YAML loading, --set overrides, strict errors naming the key."""

import pytest

from pipeline import config


def test_defaults_validate_and_roundtrip():
    cfg = config.load()
    again = config.from_dict(config.to_dict(cfg))
    assert again == cfg
    assert cfg.train.num_workers == 2 and cfg.data.max_bad_fraction == 0.01


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n  lr: 1\naugment:\n  preset: imagenet\nstorage:\n  s3:\n    endpoint_url: http://127.0.0.1:9\n")
    cfg = config.load(str(p), ["train.epochs=3", "augment.mean=[0.1, 0.2, 0.3]", "model.pretrained=null"])
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.augment.preset == "imagenet" and cfg.augment.mean == [0.1, 0.2, 0.3]
    assert cfg.storage.s3.endpoint_url == "http://127.0.0.1:9"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'; valid keys in 'train': epochs, batch_size"),
    ("trian.epochs=3", "unknown config key 'trian'; valid keys at top level: data, augment"),
    ("train.epochs=abc", "config key 'train.epochs' must be an integer, got 'abc'"),
    ("train.use_gpu=3", "config key 'train.use_gpu' must be true or false"),
    ("augment.preset=foo", "config key 'augment.preset' must be one of digits, imagenet, none"),
    ("storage.s3.endpoint=x", "unknown config key 'storage.s3.endpoint'; valid keys in 'storage.s3': endpoint_url"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("augment.device=gpu", "config key 'augment.device' must be one of cpu, cuda, worker"),
    ("augment.device=cuda", "augment.device=cuda needs train.use_gpu=true (valid without a GPU: cpu, worker)"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps must be >= 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(config.ConfigError, match="must hold a mapping"):
        config.load(str(bad))
