"""The model registry on a local folder and on S3 (moto server): versions, aliases,
champion, gate, rollback, integrity checks, and the ``imgpipe models`` commands."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import registry, storage
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.models import artifact

META = {"arch": "smallcnn", "classes": ["a", "b"], "image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """Root URI for artifacts and the registry, on each backend."""
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket")
    return str(tmp_path)


def make_artifact(base: str, tag: str, seed: int = 0, **extra) -> str:
    torch.manual_seed(seed)
    uri = storage.join(base, "runs", tag)
    artifact.save(uri, torch.nn.Linear(4, 2).state_dict(), meta={**META, **extra})
    return uri


def reg_uri(base: str) -> str:
    return storage.join(base, "registry")


def aliases(reg: str, name: str = "digits") -> dict:
    """aliases.json parsed from its raw bytes: proves it is valid JSON."""
    return json.loads(storage.read_bytes(storage.join(reg, name, "aliases.json")).decode())


def register_n(base: str, n: int, name: str = "digits") -> str:
    reg = reg_uri(base)
    for i in range(1, n + 1):
        src = make_artifact(base, f"run{i}", seed=i)
        registry.register(reg, name, src, metrics={"holdout_accuracy": 0.9 + i / 100})
    return reg


# ------------------------------------------------------------------- register


def test_register_versions_and_provenance(base):
    reg = reg_uri(base)
    src1 = make_artifact(base, "run1", seed=1)
    m1 = registry.register(reg, "digits", src1, metrics={"holdout_accuracy": 0.95},
                           config={"train": {"epochs": 3}}, data_manifest_sha256="ab" * 32)
    assert (m1["version"], m1["ref"], m1["name"]) == (1, "digits@v1", "digits")
    assert m1["uri"] == storage.join(storage.normalize(reg), "digits", "v1")
    assert m1["parent"] is None and m1["source"] == storage.normalize(src1)
    assert m1["weights_sha256"] == artifact.read_meta(src1)["weights_sha256"]
    assert storage.read_bytes(storage.join(m1["uri"], "weights.pt")) == \
        storage.read_bytes(storage.join(src1, "weights.pt"))

    m2 = registry.register(reg, "digits", make_artifact(base, "run2", seed=2),
                           metrics={"holdout_accuracy": 0.97}, parent="digits@v1")
    assert (m2["version"], m2["parent"]) == (2, "digits@v1")
    stored = artifact.read_meta(m2["uri"])
    for key in ("arch", "classes", "image_size", "mean", "std", "weights_sha256", "created",
                "metrics", "config", "data_manifest_sha256", "parent", "source"):
        assert key in stored
    assert stored["version"] == 2 and stored["metrics"] == {"holdout_accuracy": 0.97}
    # registering does not promote
    assert registry.champion(reg, "digits") is None
    assert not storage.exists(storage.join(reg, "digits", "aliases.json"))
    loaded = artifact.load(registry.resolve(reg, "digits@v2"))
    torch.manual_seed(2)
    assert torch.equal(loaded.state_dict["weight"], torch.nn.Linear(4, 2).weight.detach())


def test_register_rejects_bad_names_and_corrupt_sources(tmp_path):
    reg = str(tmp_path / "registry")
    src = make_artifact(str(tmp_path), "run1")
    for bad in ("bad/name", "a b", "", "..", "x@v1"):
        with pytest.raises(UserError, match="invalid model name"):
            registry.register(reg, bad, src, metrics={})
    storage.write_bytes(storage.join(src, "weights.pt"), b"not the weights")
    with pytest.raises(artifact.ArtifactError, match="sha256 mismatch"):
        registry.register(reg, "digits", src, metrics={})
    with pytest.raises(artifact.ArtifactError, match="no model"):
        registry.register(reg, "digits", str(tmp_path / "missing"), metrics={})
    assert storage.listdir(reg) == []


# ------------------------------------------------------ promote, resolve, aliases


def test_promote_champion_and_resolve(base):
    reg = register_n(base, 2)
    with pytest.raises(UserError, match=r"no champion.*versions: v1, v2"):
        registry.resolve(reg, "digits")

    out = registry.promote(reg, "digits@v1")
    assert out == {"name": "digits", "champion": 1, "previous": None, "reason": "manual"}
    a = aliases(reg)
    assert a["champion"] == 1 and a["history"] == [] and a["updated"]

    out = registry.promote(reg, "digits@2", reason="better")
    assert (out["champion"], out["previous"], out["reason"]) == (2, 1, "better")
    a = aliases(reg)
    assert a["champion"] == 2 and a["history"] == [1] and a["reason"] == "better"

    v2 = storage.join(storage.normalize(reg), "digits", "v2")
    for ref in ("digits@champion", "digits@v2", "digits@2", "digits"):
        assert registry.resolve(reg, ref) == v2
    assert registry.resolve(reg, "digits@v1").endswith("v1")
    champ = registry.champion(reg, "digits")
    assert champ["version"] == 2 and champ["ref"] == "digits@v2" and champ["uri"] == v2

    # promoting the champion again changes nothing (history does not grow)
    assert registry.promote(reg, "digits@champion").get("unchanged") is True
    assert aliases(reg)["history"] == [1]


def test_unknown_refs_list_what_exists(base):
    reg = register_n(base, 2)
    registry.promote(reg, "digits@v2")
    with pytest.raises(UserError) as e:
        registry.resolve(reg, "digits@v9")
    msg = str(e.value)
    assert "digits@v9" in msg and "versions: v1, v2" in msg and "champion=v2" in msg
    with pytest.raises(UserError, match=r"no model 'nope'.*models: digits"):
        registry.resolve(reg, "nope@v1")
    with pytest.raises(UserError, match="unknown tag 'latest'"):
        registry.resolve(reg, "digits@latest")
    with pytest.raises(UserError, match="bad model reference"):
        registry.resolve(reg, "digits@")
    with pytest.raises(UserError, match="no version v9"):
        registry.show(reg, "digits@v9")
    with pytest.raises(UserError, match="no version v9"):
        registry.promote(reg, "digits@v9")
    assert aliases(reg)["champion"] == 2


def test_resolve_model(base):
    reg = register_n(base, 1)
    registry.promote(reg, "digits@v1")
    ckpt = make_artifact(base, "ckpt")
    assert registry.resolve_model(ckpt, reg) == storage.normalize(ckpt)
    if not storage.is_remote(ckpt):
        assert registry.resolve_model("file://" + ckpt, reg) == ckpt
    v1 = registry.resolve(reg, "digits@v1")
    assert registry.resolve_model("digits@champion", reg) == v1
    assert registry.resolve_model("digits", reg) == v1
    assert registry.resolve_model("digits@1", reg) == v1
    for missing in (storage.join(base, "runs", "nothing"), "elsewhere/model"):
        with pytest.raises(UserError, match="model not found: .*nor a checkpoint folder"):
            registry.resolve_model(missing, reg)
    with pytest.raises(UserError, match="model not found: other .*models in registry: digits"):
        registry.resolve_model("other", reg)
    with pytest.raises(UserError, match="no version v7"):
        registry.resolve_model("digits@v7", reg)


# ---------------------------------------------------------------------- gate


def test_gate_decisions(base):
    reg = register_n(base, 6)
    g = registry.gate(reg, "digits", 1, challenger_score=0.9, champion_score=None)
    assert g["promoted"] and g["champion"] == 1 and g["challenger"] == 1
    assert "no champion" in g["reason"]
    assert aliases(reg)["champion"] == 1

    g = registry.gate(reg, "digits", 2, challenger_score=0.95, champion_score=0.9)
    assert g["promoted"] and g["champion"] == 2 and aliases(reg)["history"] == [1]

    g = registry.gate(reg, "digits", 3, challenger_score=0.95, champion_score=0.95)
    assert not g["promoted"] and g["champion"] == 2 and g["challenger"] == 3
    assert g["reason"] == "challenger 0.950 <= champion 0.950 + min_improvement 0.000: champion kept"

    g = registry.gate(reg, "digits", 4, challenger_score=0.981, champion_score=0.983)
    assert not g["promoted"] and "0.981 <= champion 0.983" in g["reason"]
    assert g["reason"].endswith("champion kept")

    g = registry.gate(reg, "digits", 5, challenger_score=0.96, champion_score=0.95,
                      min_improvement=0.02)
    assert not g["promoted"] and "< champion 0.950 + min_improvement 0.020" in g["reason"]
    assert aliases(reg)["champion"] == 2

    # exactly the required improvement passes, despite float rounding (0.9 + 0.05 > 0.95)
    g = registry.gate(reg, "digits", 6, challenger_score=0.95, champion_score=0.9,
                      min_improvement=0.05)
    assert g["promoted"] and g["champion"] == 6
    a = aliases(reg)
    assert a["champion"] == 6 and a["history"] == [1, 2] and a["reason"].startswith("gate: ")

    # the decision is recorded in each version's meta; weights stay verifiable
    for v, promoted in ((1, True), (3, False), (5, False), (6, True)):
        meta = registry.show(reg, f"digits@v{v}")
        assert meta["gate"]["promoted"] is promoted and meta["gate"]["metric"] == "holdout_accuracy"
        artifact.load(meta["uri"])
    assert registry.show(reg, "digits@v3")["gate"]["champion_version"] == 2


def test_gate_uses_stored_champion_metric(tmp_path):
    reg = register_n(str(tmp_path), 2)  # v1 has holdout_accuracy 0.91
    registry.promote(reg, "digits@v1")
    g = registry.gate(reg, "digits", 2, challenger_score=0.905, champion_score=None)
    assert not g["promoted"] and g["champion_score"] == pytest.approx(0.91)
    with pytest.raises(UserError, match="no metrics\\['f1'\\]"):
        registry.gate(reg, "digits", 2, challenger_score=0.99, champion_score=None, metric="f1")
    with pytest.raises(UserError, match="no version v5"):
        registry.gate(reg, "digits", 5, challenger_score=0.99, champion_score=0.5)


# ------------------------------------------------------------------ rollback


def test_rollback(base):
    reg = register_n(base, 3)
    with pytest.raises(UserError, match="no previous champion"):
        registry.rollback(reg, "digits")
    for v in (1, 2, 3):
        registry.promote(reg, f"digits@v{v}")
    out = registry.rollback(reg, "digits")
    assert (out["champion"], out["previous"]) == (2, 3)
    assert aliases(reg) | {"updated": None} == {"champion": 2, "history": [1], "updated": None,
                                                "reason": "rollback from v3"}
    assert registry.resolve(reg, "digits").endswith("v2")
    assert registry.rollback(reg, "digits")["champion"] == 1
    assert aliases(reg)["history"] == []
    with pytest.raises(UserError, match="cannot roll back digits.*champion=v1"):
        registry.rollback(reg, "digits")
    with pytest.raises(UserError, match="no model 'nope'"):
        registry.rollback(reg, "nope")


# ------------------------------------------------------------------ integrity


def test_tampered_version_is_refused(base):
    reg = register_n(base, 2)
    registry.promote(reg, "digits@v1")
    v2 = registry.resolve(reg, "digits@v2")
    storage.write_bytes(storage.join(v2, "weights.pt"), b"\x00" * 64)
    with pytest.raises(artifact.ArtifactError, match="refusing digits@v2: weights sha256"):
        registry.promote(reg, "digits@v2")
    with pytest.raises(artifact.ArtifactError, match="sha256 mismatch"):
        artifact.load(registry.resolve(reg, "digits@v2"))
    with pytest.raises(artifact.ArtifactError):
        registry.gate(reg, "digits", 2, challenger_score=0.99, champion_score=0.5)
    assert "gate" not in registry.show(reg, "digits@v2")
    assert aliases(reg)["champion"] == 1 and aliases(reg)["history"] == []
    # the champion itself tampered: inference through the registry refuses it
    v1 = registry.resolve(reg, "digits@champion")
    storage.write_bytes(storage.join(v1, "weights.pt"), b"garbage")
    with pytest.raises(artifact.ArtifactError):
        artifact.load(registry.resolve_model("digits@champion", reg))


# ------------------------------------------------------------------- listing


def test_list_versions_and_show(base):
    reg = reg_uri(base)
    assert registry.list_versions(reg) == {"registry": storage.normalize(reg), "models": []}
    register_n(base, 2)
    register_n(base, 1, name="faces")
    registry.promote(reg, "digits@v2")
    assert registry.list_versions(reg)["models"] == [
        {"name": "digits", "versions": 2, "champion": 2},
        {"name": "faces", "versions": 1, "champion": None},
    ]
    lst = registry.list_versions(reg, "digits")
    assert lst["name"] == "digits" and lst["champion"] == 2
    assert [v["version"] for v in lst["versions"]] == [1, 2]
    assert lst["versions"][1]["aliases"] == ["champion"] and lst["versions"][0]["aliases"] == []
    assert set(lst["versions"][0]) == {"version", "created", "metrics", "parent", "aliases", "gate"}
    assert lst["versions"][0]["metrics"] == {"holdout_accuracy": pytest.approx(0.91)}
    with pytest.raises(UserError, match="no model 'nope'.*models: digits, faces"):
        registry.list_versions(reg, "nope")

    shown = registry.show(reg, "digits")
    assert shown["version"] == 2 and shown["aliases"] == ["champion"] and shown["ref"] == "digits@v2"
    assert shown["uri"] == registry.resolve(reg, "digits@v2")
    assert shown["classes"] == ["a", "b"] and shown["weights_sha256"]
    json.dumps(shown)  # JSON-able


def test_incomplete_version_is_skipped_not_reused(tmp_path):
    reg = register_n(str(tmp_path), 1)
    # a crashed registration: weights written, meta.json never committed
    storage.write_bytes(storage.join(reg, "digits", "v2", "weights.pt"), b"partial")
    assert [v["version"] for v in registry.list_versions(reg, "digits")["versions"]] == [1]
    with pytest.raises(UserError, match="no version v2"):
        registry.resolve(reg, "digits@v2")
    m = registry.register(reg, "digits", make_artifact(str(tmp_path), "run3"), metrics={})
    assert m["version"] == 3


# ----------------------------------------------------------------------- CLI


def test_cli_models_commands(tmp_path, capsys):
    reg = register_n(str(tmp_path), 2)
    capsys.readouterr()
    assert main(["models", "promote", "digits@v1", "--registry", reg]) == 0
    assert main(["models", "promote", "digits@v2", "--registry", reg]) == 0
    capsys.readouterr()

    assert main(["models", "list", "digits", "--registry", reg, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["champion"] == 2 and len(out["versions"]) == 2

    assert main(["models", "show", "digits@champion", "--registry", reg, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == 2

    assert main(["models", "rollback", "digits", "--registry", reg]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["champion"] == 1

    assert main(["models", "show", "nope@v9", "--registry", reg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "digits" in err[0]
    assert "Traceback" not in err[0]


def test_cli_models_list_on_s3(s3_bucket, capsys):
    reg = register_n(s3_bucket, 1)
    capsys.readouterr()
    assert main(["models", "list", "--registry", reg, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["models"] == [{"name": "digits", "versions": 1, "champion": None}]
    assert main(["models", "show", "digits@v9", "--registry", reg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "versions: v1" in err[0]
