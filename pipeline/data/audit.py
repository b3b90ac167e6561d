"""The dataset audit: per-image facts gathered while packing and the ``audit`` section of
``manifest.json`` built from them (class balance, sizes, formats, bad images, exact
duplicates, label conflicts, near duplicates across splits).

Each pack task turns its good rows into a compact fact array (:data:`FACT_DTYPE`, 36
bytes an image: id key, pHash, label, width, height, format) with :func:`shard_facts`;
the driver joins them (:func:`summarize`). ``imgpipe audit DATASET`` builds the same
arrays from a committed dataset's verified shards (:func:`audit_dataset`).

Cost: width, height and format come from the image header (no decode). The 64-bit pHash
(``imagehash.phash``, optional: the ``[audit]`` extra) decodes the image once more;
JPEGs are decoded at 1/8 scale (Pillow ``draft``), which is all a 32x32 pHash needs.
Without ``imagehash`` the near-duplicate search is skipped and the audit says so.

Near duplicates (:func:`near_graph`) use multi-index hashing: split the 64 bits into
``d + 1`` chunks; two hashes within Hamming distance ``d`` agree exactly on at least one
chunk (pigeonhole), so only hashes sharing a chunk value are compared. With uniform
hashes that is about ``(d+1) * n^2 / 2^(64/(d+1))`` vectorised comparisons (n = 1M,
d = 4: ~6e8, seconds in numpy), not n^2/2 Python ones. Images with one pHash are one node
(:class:`NearGraph`): their pairs are counted, never listed; many *distinct* but close
hashes make buckets larger and the search slower.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import storage
from pipeline.data.shardset import SPLITS, Manifest, iter_split, shard_uri

try:  # optional: the [audit] extra; pack and audit work without it (no near-duplicate search)
    import imagehash
except ImportError:  # pragma: no cover - exercised only without the extra
    imagehash = None

LABEL_CONFLICT = "label_conflict"  # _errors/ reason: the same bytes listed under two labels
FACT_DTYPE = np.dtype([("key", "<u8"), ("phash", "<u8"), ("label", "<i4"), ("width", "<i4"),
                       ("height", "<i4"), ("format", "S8")])
HASH_THREADS = 8  # Pillow decodes with the GIL released
MAX_EXAMPLES = 20  # example pairs / conflicts named in the manifest
SIZE_EDGES = (32, 64, 128, 256, 512, 1024, 2048)  # px, long-side histogram bucket tops
NEAR_SKIPPED = "skipped: imagehash is not installed (pip install 'imgpipe[audit]' to enable)"


def near_enabled() -> bool:
    """Whether the near-duplicate search can run (``imagehash`` importable)."""
    return imagehash is not None


# ------------------------------------------------------------- per image (task side)


def image_facts(blob: bytes) -> tuple[int, int, str, int]:
    """(width, height, format, pHash as int; 0 without imagehash) of one validated image."""
    try:
        im = Image.open(io.BytesIO(blob))
        width, height, fmt = im.width, im.height, im.format or "?"
        if imagehash is None:
            return width, height, fmt, 0
        im.draft("L", (64, 64))  # JPEG: decode at a reduced DCT scale; a no-op for other formats
        bits = imagehash.phash(im).hash.flatten()
        return width, height, fmt, int(np.packbits(bits).view(">u8")[0])
    except (OSError, ValueError):  # validated already; a decoder disagreement costs only the hash
        return 0, 0, "?", 0


def shard_facts(table: pa.Table) -> bytes:
    """The :data:`FACT_DTYPE` rows of a shard table (image_id, image, label), as bytes."""
    ids = table.column("image_id").to_pylist()
    out = np.zeros(len(ids), FACT_DTYPE)
    if not ids:
        return out.tobytes()
    out["key"] = np.frombuffer(b"".join(bytes.fromhex(i[:16]) for i in ids), dtype=np.uint64)
    out["label"] = table.column("label").to_numpy(zero_copy_only=False)
    blobs = table.column("image").to_pylist()
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        for n, (w, h, fmt, ph) in enumerate(pool.map(image_facts, blobs)):
            out[n]["width"], out[n]["height"], out[n]["format"], out[n]["phash"] = w, h, fmt[:8], ph
    return out.tobytes()


def id_key(image_id: str) -> int:
    """The 64-bit key of a hex ``image_id``, as :func:`pipeline.data.packing.id_keys` packs it."""
    return int(np.frombuffer(bytes.fromhex(image_id[:16]), dtype=np.uint64)[0])


def facts_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=FACT_DTYPE)


def realign(facts: np.ndarray, ids: bytes) -> np.ndarray:
    """``facts`` less rows whose id key is no longer in the shard (``ids``: its keys after
    rows were dropped; a drop removes every row of an id, so keys are exact)."""
    return facts[np.isin(facts["key"], np.frombuffer(ids, dtype=np.uint64))]


def conflicting_keys(facts: Iterable[np.ndarray]) -> np.ndarray:
    """Id keys that occur with more than one label (candidates: confirm with full ids)."""
    all_facts = np.concatenate(list(facts) or [np.zeros(0, FACT_DTYPE)])
    pairs = np.unique(np.stack([all_facts["key"], all_facts["label"].astype(np.uint64)], axis=1), axis=0)
    keys, counts = np.unique(pairs[:, 0], return_counts=True) if len(pairs) else (np.zeros(0, np.uint64), [])
    return keys[np.asarray(counts) > 1]


# ------------------------------------------------------------------ near duplicates


@dataclass
class NearGraph:
    """Near-duplicate links between the *distinct* pHash values of a set of images.

    Images with the same pHash are one node: a dataset with many identical-looking images
    (blank frames, icons, the benchmark's copies of 200 pictures) then costs one node per
    value, not a pair per two images (10^5 copies of 200 pictures: ~2.5e7 image pairs).
    ``pairs`` links two distinct values within the distance; images of one value are all
    linked to each other (distance 0)."""

    inverse: np.ndarray  # image -> its value's node
    counts: np.ndarray  # (nodes, len(SPLITS)): images of each node in each split
    pairs: np.ndarray  # (k, 3) int64: node a < node b, Hamming distance <= max_distance

    def cross_split_pairs(self) -> int:
        """Image pairs (i < j) within the distance whose splits differ, counted, not listed."""
        c = self.counts.astype(np.int64)
        total = c.sum(axis=1)
        same = (total * total - (c * c).sum(axis=1)) // 2  # within one node, across splits
        a, b = self.pairs[:, 0], self.pairs[:, 1]
        linked = total[a] * total[b] - (c[a] * c[b]).sum(axis=1)
        return int(same.sum() + linked.sum())

    def image_pairs(self, groups: np.ndarray, limit: int | None = None) -> np.ndarray:
        """Cross-split image pairs (i, j, distance), i < j: those of identical pHashes first,
        then those of linked values by distance; at most ``limit`` (the report's examples;
        a test lists them all)."""
        order = np.argsort(self.inverse, kind="stable")
        starts = np.searchsorted(self.inverse[order], np.arange(len(self.counts) + 1))
        same = np.flatnonzero(np.count_nonzero(self.counts, axis=1) > 1)  # one value, two splits
        by_distance = self.pairs[np.lexsort((self.pairs[:, 1], self.pairs[:, 0], self.pairs[:, 2]))]
        links = itertools.chain(((n, n, 0) for n in same.tolist()), by_distance.tolist())
        out: list[tuple[int, int, int]] = []
        for a, b, d in links:
            mb = order[starts[b]:starts[b + 1]]
            for i in order[starts[a]:starts[a + 1]]:
                js = mb[(groups[mb] != groups[i]) & ((mb > i) if a == b else True)]
                out += [(int(min(i, j)), int(max(i, j)), d) for j in js]
                if limit is not None and len(out) >= limit:
                    return np.array(out[:limit], np.int64)
        return np.array(out, np.int64).reshape(-1, 3)


def near_graph(hashes: np.ndarray, groups: np.ndarray, max_distance: int) -> NearGraph:
    """The :class:`NearGraph` of ``hashes`` (uint64 pHashes) whose ``groups`` are split
    numbers. Multi-index hashing over the distinct values: see the module docstring."""
    values, inverse = np.unique(hashes, return_inverse=True)
    counts = np.zeros((len(values), len(SPLITS)), np.int64)
    np.add.at(counts, (inverse, np.asarray(groups, np.int64)), 1)
    return NearGraph(inverse.ravel(), counts, _value_pairs(values, max_distance))


def _value_pairs(values: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs (a, b, distance), a < b, of distinct ``values`` within ``max_distance`` bits."""
    n, chunks = len(values), max_distance + 1
    found: list[np.ndarray] = [np.zeros((0, 3), np.int64)]
    if n < 2 or max_distance < 0:
        return found[0]
    width = 64 // chunks
    for c in range(chunks):
        lo = c * width
        bits = width if c < chunks - 1 else 64 - lo
        key = (values >> np.uint64(lo)) & np.uint64((1 << bits) - 1) if bits < 64 else values
        order = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[order])) + 1
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [n]])
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = order[s:e]
            a_idx, b_idx = np.triu_indices(len(members), k=1)
            a, b = members[a_idx], members[b_idx]
            dist = np.bitwise_count(values[a] ^ values[b]).astype(np.int64)
            ok = dist <= max_distance
            found.append(np.stack([np.minimum(a, b)[ok], np.maximum(a, b)[ok], dist[ok]], axis=1).astype(np.int64))
    return np.unique(np.concatenate(found), axis=0)


@dataclass
class Shard:
    """One shard as the audit sees it: where it is and its facts, row-aligned."""

    split: str
    uri: str
    facts: np.ndarray


def near_moves(shards: list[Shard], max_distance: int, keep_order: tuple[str, ...]) -> dict[int, dict[int, str]]:
    """For ``data.dedupe: near``: shard index -> {id key: split to move to}. Near duplicates
    are linked transitively into groups (connected components of the :class:`NearGraph`);
    a group with members in two splits goes to the first split of ``keep_order`` it has a
    member in (the holdout keeps its images)."""
    facts = np.concatenate([s.facts for s in shards] or [np.zeros(0, FACT_DTYPE)])
    split_of = np.concatenate([np.full(len(s.facts), SPLITS.index(s.split)) for s in shards] or [np.zeros(0, int)])
    g = near_graph(facts["phash"], split_of, max_distance)
    nodes = len(g.counts)
    links = coo_matrix((np.ones(len(g.pairs)), (g.pairs[:, 0], g.pairs[:, 1])), shape=(nodes, nodes))
    _, component = connected_components(links, directed=False)
    present = np.zeros((component.max(initial=-1) + 1, len(SPLITS)), np.int64)
    np.add.at(present, component, g.counts)
    rank = [SPLITS.index(s) for s in keep_order]  # split numbers, most kept first
    target = np.array([next(r for r in rank if row[r]) if np.count_nonzero(row) > 1 else -1 for row in present])
    image_target = target[component[g.inverse]]
    moving = np.flatnonzero((image_target >= 0) & (image_target != split_of))
    owner = np.repeat(np.arange(len(shards)), [len(s.facts) for s in shards])
    out: dict[int, dict[int, str]] = {}
    for i in moving:
        out.setdefault(int(owner[i]), {})[int(facts["key"][i])] = SPLITS[image_target[i]]
    return out


def summarize(classes: list[str], shards: list[Shard], bad_reasons: dict[str, int], cross_split: int,
              max_distance: int, near_moved: int = 0) -> dict[str, Any]:
    """The manifest's ``audit`` section; ``shards``' facts are row-aligned with their shards."""
    facts = np.concatenate([s.facts for s in shards] or [np.zeros(0, FACT_DTYPE)])
    split_of = np.concatenate([np.full(len(s.facts), SPLITS.index(s.split)) for s in shards] or [np.zeros(0, int)])
    return {"classes": _class_counts(classes, facts, split_of), "long_side_px": _sizes(facts),
            "formats": dict(Counter(f.decode() for f in facts["format"]).most_common()),
            "bad_images": dict(bad_reasons), "exact_duplicates": _exact(facts, cross_split),
            "label_conflicts": {"quarantined": int(bad_reasons.get(LABEL_CONFLICT, 0))},
            "near_duplicates": {**_near(shards, facts, split_of, max_distance), "moved_into_one_split": near_moved}}


def _class_counts(classes: list[str], facts: np.ndarray, split_of: np.ndarray) -> dict[str, Any]:
    counts = {c: {"total": 0, **{s: 0 for s in SPLITS}} for c in classes}
    for k, s in enumerate(SPLITS):
        for label, n in zip(*np.unique(facts["label"][split_of == k], return_counts=True)):
            counts[classes[int(label)]][s] = int(n)
            counts[classes[int(label)]]["total"] += int(n)
    totals = [v["total"] for v in counts.values()]
    ratio = (max(totals) / min(totals)) if totals and min(totals) > 0 else None
    return {"counts": counts, "imbalance_ratio": ratio}


def _sizes(facts: np.ndarray) -> dict[str, int]:
    long_side = np.maximum(facts["width"], facts["height"])
    names = [f"<={e}" for e in SIZE_EDGES] + [f">{SIZE_EDGES[-1]}"]
    counts = np.bincount(np.searchsorted(SIZE_EDGES, long_side), minlength=len(names))
    return {name: int(n) for name, n in zip(names, counts) if n}


def _exact(facts: np.ndarray, cross_split: int) -> dict[str, int]:
    _, counts = np.unique(facts["key"], return_counts=True)
    return {"images_with_copies": int((counts > 1).sum()), "extra_copies": int((counts - 1).sum()),
            "copies_removed_across_splits": int(cross_split)}


def _near(shards: list[Shard], facts: np.ndarray, split_of: np.ndarray, max_distance: int) -> dict[str, Any]:
    if imagehash is None:
        return {"max_distance": max_distance, "pairs": None, "skipped": NEAR_SKIPPED}
    g = near_graph(facts["phash"], split_of, max_distance)
    return {"method": "phash (imagehash, 64 bit)", "max_distance": max_distance, "pairs": g.cross_split_pairs(),
            "examples": _examples(shards, g.image_pairs(split_of, MAX_EXAMPLES))}


def _examples(shards: list[Shard], pairs: np.ndarray) -> list[dict[str, Any]]:
    """Sources of the first pairs: reads the ``source`` column of their shards only."""
    starts = np.cumsum([0] + [len(s.facts) for s in shards])
    cache: dict[int, list[str]] = {}

    def where(i: int) -> dict[str, str]:
        n = int(np.searchsorted(starts, i, side="right") - 1)
        if n not in cache:
            cache[n] = _sources(shards[n].uri)
        return {"split": shards[n].split, "source": cache[n][i - starts[n]]}

    return [{"a": where(int(i)), "b": where(int(j)), "distance": int(d)} for i, j, d in pairs]


def _sources(uri: str) -> list[str]:
    return storage.read_table(uri, columns=["source"]).column("source").to_pylist()


# ------------------------------------------------------------ a committed dataset


def audit_dataset(m: Manifest, max_distance: int) -> dict[str, Any]:
    """The ``audit`` section of committed dataset ``m``, from its verified shards."""
    shards = []
    for split in m.splits:
        for entry, table in zip(m.splits[split], iter_split(m, split, columns=["image_id", "image", "label"])):
            shards.append(Shard(split, shard_uri(m.root, entry["path"]), facts_of(shard_facts(table))))
    return summarize(m.classes, shards, m.raw.get("bad_reasons", {}), m.raw.get("cross_split_duplicates", 0),
                     max_distance)
