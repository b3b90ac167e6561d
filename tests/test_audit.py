"""Dataset audit (issue 17): pack's audit section and page, exact duplicates kept in one
split, label conflicts quarantined, near duplicates across splits found (and moved with
``data.dedupe: near``), ``imgpipe audit DATASET``."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import audit, listings, packing, shardset
from pipeline.workflows import audit as audit_workflow
from tests.conftest import small_config

PER_CLASS = 30
FRACTIONS = {"val_fraction": 0.3, "test_fraction": 0.3}


def _texture(seed: int) -> Image.Image:
    """A 64x64 photo-like RGB image: smooth colour blobs (bicubic upsampling of 8x8 noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC)


def _cross_split_pair(root: str) -> tuple[str, str]:
    """A near-duplicate file name (re-encoded, resized copy) that pack's seeded split puts in
    another split than its original; found with pack's own split function."""
    for i in range(PER_CLASS):
        copy = f"{root}/a/{i:03d}_small.jpg"
        _texture(1000 + i).resize((48, 48), Image.Resampling.BILINEAR).save(copy, quality=70)
        listing = listings.list_source(root)
        parts = packing.assign_splits(listing, FRACTIONS["val_fraction"], FRACTIONS["test_fraction"], seed=0)
        split_of = {listing.column("source")[j].as_py(): s for s, idx in parts.items() for j in idx}
        original = f"{root}/a/{i:03d}.png"
        if split_of[copy] != split_of[original]:
            return original, copy
        os.remove(copy)
    raise AssertionError("no cross-split placement found")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two classes of textures with planted problems: an exact copy (same class), the same
    bytes under both classes (a label conflict), and a near duplicate across splits."""
    root = str(tmp_path_factory.mktemp("audit") / "src")
    for c, base in (("a", 1000), ("b", 2000)):
        os.makedirs(f"{root}/{c}")
        for i in range(PER_CLASS):
            _texture(base + i).save(f"{root}/{c}/{i:03d}.png")
    shutil.copy(f"{root}/a/005.png", f"{root}/a/005_copy.png")
    shutil.copy(f"{root}/a/005.png", f"{root}/a/005_copy2.png")
    shutil.copy(f"{root}/b/007.png", f"{root}/a/conflict.png")
    original, copy = _cross_split_pair(root)
    return {"root": root, "near": (original, copy), "copies": {f"{root}/a/005{s}.png" for s in ("", "_copy", "_copy2")},
            "conflict": {f"{root}/b/007.png", f"{root}/a/conflict.png"}}


def _rows(dst):
    m = shardset.read_manifest(dst)
    return m, {s: [r for t in shardset.iter_split(m, s, columns=["source", "label", "image_id"])
                   for r in t.to_pylist()] for s in m.splits}


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", "--quiet", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_pack_audits_and_reports(planted, tmp_path, ray_local):
    dst = str(tmp_path / "ds")
    # `imgpipe pack`'s handler (in-process: a subprocess would start Ray again)
    out = audit_workflow.pack(planted["root"], dst, small_config(data={**FRACTIONS, "shard_rows": 16}), quiet=True)
    m, rows = _rows(dst)
    a = m.raw["audit"]
    where = {r["source"]: s for s, rs in rows.items() for r in rs}
    # exact copies: every kept copy in one split
    assert len({where[s] for s in planted["copies"] if s in where}) == 1
    # the same bytes under two labels: trained on under neither, quarantined with the reason
    assert not planted["conflict"] & set(where)
    errors = pq.read_table(f"{dst}/_errors").to_pylist()
    assert {e["source"] for e in errors if e["error"].startswith("label_conflict")} == planted["conflict"]
    assert a["label_conflicts"]["quarantined"] == 2 == out["label_conflicts"]
    assert m.raw["bad_reasons"] == {"label_conflict": 2}
    # near duplicates across splits: the planted pair, named
    near = a["near_duplicates"]
    assert near["pairs"] >= 1 and out["near_duplicate_pairs"] == near["pairs"]
    assert any({e["a"]["source"], e["b"]["source"]} == set(planted["near"]) for e in near["examples"])
    assert a["formats"] == {"PNG": sum(len(r) for r in rows.values()) - 1, "JPEG": 1}
    assert a["classes"]["counts"]["b"]["total"] == PER_CLASS - 1
    assert a["classes"]["imbalance_ratio"] == pytest.approx(
        a["classes"]["counts"]["a"]["total"] / (PER_CLASS - 1))
    page = open(out["report"]).read()
    assert "Near duplicates across splits" in page and os.path.basename(planted["near"][1]) in page
    # imgpipe audit DATASET: the same numbers from the committed shards; manifest untouched
    sha = m.sha256
    p = _run("audit", dst)
    assert p.returncode == 0, p.stderr
    again = json.load(open(json.loads(p.stdout.strip().splitlines()[-1])["audit"]))
    assert again["near_duplicates"]["pairs"] == near["pairs"]
    assert again["classes"] == a["classes"] and again["label_conflicts"] == a["label_conflicts"]
    assert shardset.read_manifest(dst).sha256 == sha


def test_audit_without_imagehash_skips_near_search(planted, tmp_path, ray_local):
    dst = str(tmp_path / "ds")
    packing.pack(planted["root"], dst, small_config(data=FRACTIONS), quiet=True)
    code = ("import sys; sys.modules['imagehash'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['--quiet', 'audit', {dst!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["near_duplicate_pairs"] is None and "pip install 'imgpipe[audit]'" in out["near_duplicates_skipped"]


def test_dedupe_near_moves_the_pair_into_one_split(planted, tmp_path, ray_local):
    dst = str(tmp_path / "ds")
    packing.pack(planted["root"], dst, small_config(data={**FRACTIONS, "dedupe": "near"}), quiet=True)
    m, rows = _rows(dst)
    where = {r["source"]: s for s, rs in rows.items() for r in rs}
    assert where[planted["near"][0]] == where[planted["near"][1]]
    near = m.raw["audit"]["near_duplicates"]
    assert near["pairs"] == 0 and near["moved_into_one_split"] >= 1
    # 60 originals + 2 exact copies + the conflict copy + the near copy, less the 2 conflict rows
    # and copies dropped from other splits: nothing else is lost by moving
    assert len(where) == 2 * PER_CLASS + 4 - 2 - m.raw["cross_split_duplicates"]


A, B, C = 0xFFFF0000FFFF0000, 0x0000FFFF0000FFFF, 0x00FF00FF00FF00FF  # 32 to 64 bits apart


def _brute(hashes, groups, d):
    return {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
            if groups[i] != groups[j] and bin(int(hashes[i] ^ hashes[j])).count("1") <= d}


def test_near_pairs_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 3))
    near = base.copy()
    for i, bits in enumerate(flips):  # 0 to 3 bit flips of each hash
        for b in bits[: i % 4]:
            near[i] ^= np.uint64(1) << np.uint64(b)
    hashes = np.concatenate([base, near, base[:40]])  # and 40 identical copies in a third split
    groups = np.concatenate([np.zeros(300, int), np.ones(300, int), np.full(40, 2)])
    g = audit.near_graph(hashes, groups, 4)
    found = {(int(i), int(j)) for i, j, _ in g.image_pairs(groups)}
    brute = _brute(hashes, groups, 4)
    assert found == brute and g.cross_split_pairs() == len(brute) >= 300


def test_identical_hashes_are_counted_not_listed():
    """10^5 images of 3 pictures (a pHash each) in 3 splits: ~1.7e9 cross-split pairs,
    counted from 3 nodes; the examples come first from identical hashes."""
    n = 100_000
    hashes = np.array([A, B, B ^ 1], np.uint64)[np.arange(n) % 3]
    groups = (np.arange(n) // 7) % 3
    g = audit.near_graph(hashes, groups, 4)
    assert len(g.counts) == 3 and g.pairs.tolist() == [[0, 1, 1]]  # nodes in value order: B ^ 1, B, A
    small = slice(0, 60)  # the same count on a slice small enough for brute force
    gs = audit.near_graph(hashes[small], groups[small], 4)
    assert gs.cross_split_pairs() == len(_brute(hashes[small], groups[small], 4))
    c = g.counts
    same = sum((c[k].sum() ** 2 - (c[k] ** 2).sum()) // 2 for k in range(3))
    assert g.cross_split_pairs() == same + c[0].sum() * c[1].sum() - (c[0] * c[1]).sum()
    examples = g.image_pairs(groups, limit=5)
    assert len(examples) == 5 and (examples[:, 2] == 0).all()
    assert all(hashes[i] == hashes[j] and groups[i] != groups[j] for i, j, _ in examples)


def test_near_moves_sends_each_group_to_one_split():
    """Copies of one picture in train, val and test go to test (the holdout keeps its
    images); a picture only in train stays; linked values move together."""
    facts = np.zeros(9, audit.FACT_DTYPE)
    facts["key"] = np.arange(9) + 100
    facts["phash"] = [A, A, A, A, B, B, C, C ^ 1, C ^ 2]
    splits = ["train", "train", "val", "test", "train", "train", "train", "train", "val"]
    shards = [audit.Shard(s, f"mem://{k}", facts[k:k + 1]) for k, s in enumerate(splits)]
    moves = audit.near_moves(shards, 4, ("test", "val", "train"))
    assert moves == {0: {100: "test"}, 1: {101: "test"}, 2: {102: "test"}, 6: {106: "val"}, 7: {107: "val"}}


def test_bad_dedupe_settings_exit_2(planted, tmp_path):
    p = _run("pack", planted["root"], str(tmp_path / "x"), "--set", "data.near_dup_distance=99")
    assert p.returncode == 2 and "data.near_dup_distance" in p.stderr


@pytest.mark.slow
def test_flipped_labels_rank_near_the_top(tmp_path, ray_local):
    """Confident learning on held-out predictions: ~5% of the labels flipped on purpose in
    600 digits; a short training run; the flipped held-out images should lead the ranking."""
    from pipeline.data import digits
    from pipeline.training import driver

    root = str(tmp_path / "digits")
    digits.write_digits(root, limit=60)
    rng = np.random.default_rng(0)
    rows, flipped = [], set()
    for c in sorted(os.listdir(root)):
        for f in sorted(os.listdir(f"{root}/{c}")):
            uri, label = f"{root}/{c}/{f}", int(c)
            if rng.random() < 0.05:
                label = (label + int(rng.integers(1, 10))) % 10
                flipped.add(uri)
            rows.append(f"{uri},{label}\n")
    (tmp_path / "labels.csv").write_text("uri,label\n" + "".join(rows))
    dst = str(tmp_path / "ds")
    cfg = small_config(data={"manifest": dst, "val_fraction": 0.25, "test_fraction": 0.25, "shard_rows": 64},
                       train={"storage": str(tmp_path / "runs"), "run_name": "flip", "epochs": 6})
    packing.pack(str(tmp_path / "labels.csv"), dst, cfg, quiet=True)
    model = driver.run(cfg, quiet=True)["best_checkpoint_uri"]
    out = audit_workflow.run(dst, cfg, model=model, quiet=True)
    issues = pq.read_table(out["label_issues_uri"]).to_pylist()
    m, split_rows = _rows(dst)
    held_out_flipped = {r["source"] for s in ("val", "test") for r in split_rows[s]} & flipped
    found = {r["source"] for r in issues[:2 * len(held_out_flipped)]} & held_out_flipped
    recall = len(found) / len(held_out_flipped)
    print(f"label issues: {len(issues)} flagged; recall of {len(held_out_flipped)} flipped held-out labels "
          f"in the top {2 * len(held_out_flipped)}: {recall:.2f}")
    assert len(held_out_flipped) >= 5 and recall >= 0.5
    assert {"source", "image_id", "split", "given_label", "suggested_label", "score"} <= set(issues[0])
    assert "Suspected label errors" in open(out["report"]).read()
