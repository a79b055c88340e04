"""Checks, with pylance, that datasets written by distillery-cache match docs/cache-format.md.

Usage: python pylance_check.py FACES_URI CACHE_URI EXPECTED_FACES EXPECTED_CACHE_ROWS
Exits non-zero (AssertionError) on any mismatch.
"""

import json
import sys

import lance
import pyarrow as pa

faces_uri, cache_uri, n_faces, n_rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

FACES = pa.schema([
    pa.field("face_id", pa.utf8(), False),
    pa.field("image", pa.large_binary(), False),
    pa.field("format", pa.utf8(), False),
    pa.field("width", pa.uint32(), False),
    pa.field("height", pa.uint32(), False),
    pa.field("box", pa.list_(pa.float32(), 4), True),
    pa.field("label", pa.uint32(), True),
    pa.field("valence", pa.float32(), True),
    pa.field("arousal", pa.float32(), True),
    pa.field("split", pa.utf8(), False),
    pa.field("source", pa.utf8(), False),
])

faces = lance.dataset(faces_uri)
assert faces.schema.remove_metadata().equals(FACES), f"faces schema:\n{faces.schema}"
assert faces.count_rows() == n_faces, faces.count_rows()
t = faces.to_table()
ids = t.column("face_id").to_pylist()
assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
for fmt, img in zip(t.column("format").to_pylist(), t.column("image").to_pylist()):
    assert fmt == "png" and img.startswith(b"\x89PNG"), fmt
assert set(t.column("split").to_pylist()) <= {"train", "val", "test"}

cache = lance.dataset(cache_uri)
s = cache.schema
expected = {
    "face_id": pa.utf8(), "fingerprint": pa.utf8(), "teacher": pa.utf8(), "view": pa.uint32(),
    "view_crop": pa.list_(pa.float32(), 4), "view_flip": pa.bool_(),
    "valence": pa.float32(), "arousal": pa.float32(), "embedding": pa.list_(pa.float32()),
    "landmarks": pa.list_(pa.float32()), "shard": pa.utf8(), "worker": pa.utf8(),
    "created_at": pa.timestamp("us", tz="UTC"),
}
assert s.names == ["face_id", "fingerprint", "teacher", "view", "view_crop", "view_flip", "logits",
                   "valence", "arousal", "embedding", "landmarks", "shard", "worker", "created_at"], s.names
for name, ty in expected.items():
    assert s.field(name).type == ty, f"{name}: {s.field(name).type} != {ty}"
assert s.field("logits").type in (pa.list_(pa.float32()), pa.list_(pa.float16())), s.field("logits").type
assert cache.count_rows() == n_rows, cache.count_rows()
c = cache.to_table()
# Teacher metadata lives in the manifest config.
cfg = cache.config() if callable(cache.config) else cache.config
teachers = {k: json.loads(v) for k, v in cfg.items() if k.startswith("distillery.teacher.")}
assert teachers, f"no teacher config in {cfg}"
for fp, meta in teachers.items():
    n_classes = len(meta["classes"])
    assert fp.endswith(meta["fingerprint"])
    lens = {len(x) for x, f in zip(c.column("logits").to_pylist(), c.column("fingerprint").to_pylist())
            if f == meta["fingerprint"]}
    assert lens == {n_classes}, (lens, n_classes)
for lm in c.column("landmarks").to_pylist():
    assert lm is None or len(lm) == 136
assert set(c.column("face_id").to_pylist()) <= set(ids)
print(f"pylance {lance.__version__}: faces {n_faces} rows, cache {n_rows} rows, "
      f"{len(teachers)} teacher(s): schemas as documented")
