"""Regenerate the trimmed KubeRay CRD schemas in this folder from the CRD files of a
KubeRay release (``ray-operator/config/crd/bases/ray.io_<kind>.yaml``, Apache-2.0):

    python tests/schemas/vendor_kuberay.py /path/to/kuberay-crds v1.6.2 v1.7.0

Trimming keeps, per version and kind (RayCluster, RayJob), the ``openAPIV3Schema`` of the
served ``ray.io/v1`` version and drops every ``description`` (documentation only; the
API server does not validate with it). Nothing else is changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent / "kuberay"
KINDS = ("rayclusters", "rayjobs")


def _strip(node):
    if isinstance(node, dict):
        # a property that is itself named "description" is kept (it is a field, not a doc)
        return {k: (_strip(v) if k != "properties" else {pk: _strip(pv) for pk, pv in v.items()})
                for k, v in node.items() if k != "description" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def trim(crd: dict) -> dict:
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"], "ray.io/v1 is not served"
    return _strip(v1["schema"]["openAPIV3Schema"])


def main(src: str, *versions: str) -> None:
    for version in versions:
        out = HERE / version
        out.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            crd = yaml.safe_load((Path(src) / version / f"{kind}.yaml").read_text())
            text = json.dumps(trim(crd), sort_keys=True, separators=(",", ":"))
            (out / f"{kind}.json").write_text(text + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
