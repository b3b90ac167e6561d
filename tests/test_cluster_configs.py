"""Everything under cluster/ stays true to the code: every imgpipe / ``python -m
pipeline`` / ``python -m jobs.X`` command in the manifests and in cluster/README.md
parses with the CLI's own parser, every jobs module exists, every config they name
validates, and the manifests agree with each other (names, services, mounts)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
DATE = "2025-01-31"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
MANIFESTS = [p for p in YAML_FILES if "configs" not in p.relative_to(CLUSTER).parts]
CONFIGS = sorted((CLUSTER / "configs").glob("*.yaml"))


# --------------------------------------------------------------- command finding


def _strings(node) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _segments(text: str) -> list[list[str]]:
    """Shell text -> simple commands (split at ; & | && ||), without redirections."""
    text = re.sub(r"\$\(date[^)]*\)", DATE, text)  # $(date +%F), $(date -u +%F), $(date +\%F)
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    toks = list(lex)
    out: list[list[str]] = [[]]
    skipping = False
    for i, tok in enumerate(toks):
        if tok and set(tok) <= set(";&|<>"):
            if "<" in tok or ">" in tok:
                skipping = True  # a redirection: its target is no argument
            else:
                out.append([])
                skipping = False
            continue
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        if tok.isdigit() and nxt[:1] in ("<", ">"):
            continue  # the fd of 2>&1
        if not skipping:
            out[-1].append(tok)
    return [s for s in out if s]


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """imgpipe commands in ``text``: (how it was invoked, argv for build_parser())."""
    found = []
    for seg in _segments(text):
        while seg and (seg[0] in ("exec", "env") or re.fullmatch(r"[A-Z_]+=.*", seg[0])):
            seg = seg[1:]
        if not seg:
            continue
        if seg[0] == "imgpipe":
            found.append(("imgpipe", seg[1:]))
        elif seg[:3] == ["python", "-m", "pipeline"]:
            found.append(("python -m pipeline", seg[3:]))
        elif len(seg) >= 3 and seg[:2] == ["python", "-m"] and seg[2].startswith("jobs."):
            found.append((f"python -m {seg[2]}", [seg[2].split(".", 1)[1], *seg[3:]]))
        elif seg[:3] == ["ray", "job", "submit"] and "--" in seg:
            found.extend(_commands(shlex.join(seg[seg.index("--") + 1:])))
    return found


def _readme_code_lines() -> list[str]:
    """Indented code lines of cluster/README.md, backslash continuations joined."""
    lines, cur = [], ""
    for raw in (CLUSTER / "README.md").read_text().splitlines():
        if not raw.startswith("    "):
            if cur:
                lines.append(cur)
            cur = ""
            continue
        part = raw.strip()
        if part.endswith("\\") and not part.endswith("\\\\"):
            cur += part[:-1] + " "
        else:
            lines.append(cur + part)
            cur = ""
    if cur:
        lines.append(cur)
    return lines


def _parse(argv: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `imgpipe {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


def _config_path(ref: str, where: str) -> Path:
    """A config named by a command -> the file under cluster/configs it stands for
    (/configs/X on Kubernetes is the ConfigMap made from cluster/configs/)."""
    if ref.startswith("/configs/"):
        path = CLUSTER / "configs" / ref[len("/configs/"):]
    else:
        path = ROOT / ref
    assert path.is_file(), f"{where}: config {ref} is not a file under cluster/configs ({path})"
    assert path.parent == CLUSTER / "configs", f"{where}: config {ref} is not under cluster/configs"
    return path


def _check(how: str, argv: list[str], where: str, seen: list[tuple[str, list[str]]]) -> None:
    if how.startswith("python -m jobs."):
        module = how.split()[-1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        assert (ROOT / "jobs" / f"{module.split('.')[1]}.py").is_file(), f"{where}: {module} is not in jobs/"
    ns = _parse(argv, where)
    seen.append((how, argv))
    if ns.command == "submit":
        rest = list(ns.args)
        rest = rest[1:] if rest[:1] == ["--"] else rest
        assert rest, f"{where}: submit without a command after --"
        _check("submitted", rest, where, seen)
        return
    ref = getattr(ns, "config", None)
    if ref:
        path = _config_path(ref, where)
        config.load(str(path), list(getattr(ns, "overrides", [])))


def _all_commands() -> dict[str, list[tuple[str, list[str]]]]:
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for path in MANIFESTS:
        rel = str(path.relative_to(ROOT))
        for doc in yaml.safe_load_all(path.read_text()):
            for s in _strings(doc):
                if " " not in s.strip():
                    continue  # a name (cluster_name: imgpipe), not a command line
                for how, argv in _commands(s):
                    _check(how, argv, rel, out.setdefault(rel, []))
    for line in _readme_code_lines():
        for how, argv in _commands(line):
            _check(how, argv, "cluster/README.md", out.setdefault("cluster/README.md", []))
    return out


# ------------------------------------------------------------------------ tests


def test_every_yaml_parses():
    assert len(YAML_FILES) >= 8, YAML_FILES
    for path in YAML_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        for d in docs:
            assert isinstance(d, dict), f"{path}: a document is not a mapping"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_validate(path):
    from pipeline.models import zoo as models

    cfg = config.load(str(path))
    assert cfg.model.arch in models.available()
    raw = yaml.safe_load(path.read_text())
    assert raw, f"{path.name} sets nothing"


def test_digits_config_shows_every_section():
    raw = yaml.safe_load((CLUSTER / "configs" / "digits.yaml").read_text())
    assert set(raw) == {f.name for f in config.dataclasses.fields(config.Config)}


def test_commands_parse_and_name_valid_configs():
    found = _all_commands()
    total = sum(len(v) for v in found.values())
    assert total >= 16, found  # the manifests and the README hold at least this many
    for rel in ("cluster/kuberay/rayjob-train.yaml", "cluster/kuberay/rayjob-predict.yaml",
                "cluster/kuberay/cronjob-retrain.yaml", "cluster/README.md"):
        assert found.get(rel), f"no imgpipe command found in {rel}"
    subcommands = {argv[0] for cmds in found.values() for _, argv in cmds}
    assert {"train", "predict", "retrain", "submit", "pack", "evaluate"} <= subcommands
    hows = {how for cmds in found.values() for how, _ in cmds}
    assert {"imgpipe", "python -m jobs.train", "python -m jobs.predict"} <= hows


def test_command_finder_catches_mistakes():
    """The checker itself can fail: an unknown subcommand or flag is reported."""
    cmds = _commands("exec imgpipe submit --address http://h:8265 --wait -- retrain c.yaml --date $(date +%F)")
    assert cmds == [("imgpipe", ["submit", "--address", "http://h:8265", "--wait", "--",
                                 "retrain", "c.yaml", "--date", DATE])]
    assert _commands("cd /srv && imgpipe models list >> /var/log/x.log 2>&1") == [("imgpipe", ["models", "list"])]
    assert _commands("imgpipe models list 2>&1 | tee x") == [("imgpipe", ["models", "list"])]
    assert _commands("ray job submit --working-dir . -- python -m jobs.pack a b") == \
        [("python -m jobs.pack", ["pack", "a", "b"])]
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(["retrain", "c.yaml"], "x")  # --date is required
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(["trian", "c.yaml"], "x")
    with pytest.raises(AssertionError, match="not a file"):
        _config_path("/configs/missing.yaml", "x")


def test_aws_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-autoscaler.yaml").read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and t not in gpu]
    assert gpu and cpu, "needs a CPU and a GPU worker type"
    assert all(t["max_workers"] >= 1 for n, t in types.items() if n != cfg["head_node_type"])
    assert any("pip install" in c and "imgpipe" in c for c in cfg["setup_commands"])


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def test_kuberay_manifests_agree():
    (rc,) = _docs("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    name = rc["metadata"]["name"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(gpu_limits["nvidia.com/gpu"]) == "1"
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head_pod["containers"][0]["volumeMounts"]}
    assert "/configs" in mounts  # where the RayJobs and the CronJob find their configs
    assert any(v["name"] == mounts["/configs"] and "configMap" in v for v in head_pod["volumes"])

    for job in ("rayjob-train.yaml", "rayjob-predict.yaml"):
        (rj,) = _docs(job)
        assert rj["kind"] == "RayJob"
        assert rj["spec"]["clusterSelector"]["ray.io/cluster"] == name
        assert rj["spec"]["entrypoint"].startswith("python -m jobs.")

    (cron,) = _docs("cronjob-retrain.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    (how, argv), *nested = _commands(" ".join(container["command"][2:] + container["args"]))
    ns = _parse(argv, "cronjob-retrain.yaml")
    assert ns.command == "submit" and ns.wait
    assert ns.address == f"http://{name}-head-svc:8265"  # KubeRay's head service name
    assert ns.submission_id == f"retrain-{DATE}"  # one id per night: a retried pod is a no-op
    rest = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    assert rest[:1] == ["retrain"] and rest[-2:] == ["--date", DATE]


def test_readme_has_the_crontab_line():
    text = (CLUSTER / "README.md").read_text()
    line = next(s for s in _readme_code_lines() if s.startswith("0 2 * * *"))
    assert r"$(date +\%F)" in line  # % is special in crontab
    (how, argv), = _commands(line.split(" ", 5)[5])
    ns = _parse(argv, "README crontab")
    assert ns.command == "submit" and ns.wait and ns.submission_id == f"retrain-{DATE}"
    assert "ray job submit" in text and "kubectl apply -f cluster/kuberay/cronjob-retrain.yaml" in text
