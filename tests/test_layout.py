"""The output layout is known in one module (segdist.proposals.layout), and the proposal store's
public shard API: picklable shards, each read on its own, and the manifest read once."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

from test_evaluation import hard_case

from segdist.proposals.layout import write_chunk
from segdist.proposals.store import open_proposals

ROOT = Path(__file__).resolve().parents[1]

#: New names for every part of the layout; the test edits layout.py alone to use them.
RENAMED = {"PARQUET_DIR": "pq-files", "COCO_DIR": "json-files", "MANIFEST": "run-manifest.json",
           "STATE_DIR": "_state", "RUN_FILE": "settings.json", "CHUNKS_DIR": "done",
           "EVAL_DIR": "report", "CHUNK_PREFIX": "part-"}

# Runs against the edited copy of the package: the job's state and manifest writers, the chunk
# writer, the store, the evaluation (CLI) and the job's cleanup, all through their own code.
_SCRIPT = r"""
import json, os, sys
from segdist import storage
from segdist.cli import main
from segdist.job import manifest as job_manifest, state
from segdist.proposals import layout
from segdist.proposals.store import open_proposals
sys.path.insert(0, sys.argv[3])
from test_evaluation import hard_case

out, gt_path = sys.argv[1], sys.argv[2]
gt_dict, props = hard_case(3, n_images=8)
json.dump(gt_dict, open(gt_path, "w"))
ids = sorted(props)
state.write_run_record(out, state.RunRecord(fingerprint="f", settings={}), None)
records = {}
for i in range(2):
    chunk = [props[k] for k in ids[4 * i:4 * i + 4]]
    files = layout.write_chunk(out, i, chunk, ["parquet", "coco-json"])
    rec = state.ChunkRecord(
        index=i, name=layout.chunk_name(i), image_ids=[p.image_id for p in chunk],
        proposals=sum(len(p) for p in chunk),
        files={k: {"path": state.relative_to(out, v["uri"])} for k, v in files.items()})
    storage.atomic_write(state.chunk_record_uri(out, i), rec.to_json())  # as the worker does
    records[i] = rec
job_manifest.write_manifest(out, job_manifest.build_manifest(
    config={}, model={"name": "layout-test"}, dataset={}, chunk_size=4, n_chunks=2,
    records=records, failed_chunks=[], timings={}))
committed = sorted(state.scan_committed(out, 2, None).committed)
store = open_proposals(out)
coco = open_proposals(os.path.join(out, layout.COCO_DIR))
rc = main(["evaluate", "--proposals", out, "--dataset", gt_path, "--no-progress"])
tree = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
state.clear_output(out, None)
left = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
print(json.dumps({"committed": committed, "has_files": True, "kind": store.kind,
                  "shards": [s.name for s in store.shards()], "coco_kind": coco.kind,
                  "coco_shards": [s.name for s in coco.shards()],
                  "manifest_model": store.manifest["model"]["name"],
                  "coco_manifest_model": coco.manifest["model"]["name"],
                  "rc": rc, "tree": tree, "left": left}))
"""


def test_a_layout_change_in_layout_py_alone_reaches_job_store_and_evaluation(tmp_path):
    pkg = tmp_path / "src" / "segdist"
    shutil.copytree(ROOT / "segdist", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    source = (pkg / "proposals" / "layout.py").read_text()
    for name, value in RENAMED.items():
        source, n = re.subn(rf'^{name} = "[^"]*"$', f'{name} = "{value}"', source, flags=re.M)
        assert n == 1, name
    (pkg / "proposals" / "layout.py").write_text(source)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "src"))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(out), str(tmp_path / "gt.json"),
                           str(ROOT / "tests")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["committed"] == [0, 1] and r["rc"] == 0
    assert r["kind"] == "parquet" and r["shards"] == ["part-000000.parquet", "part-000001.parquet"]
    assert r["coco_kind"] == "coco-json" and r["coco_shards"] == ["part-000000.segm.json",
                                                                  "part-000001.segm.json"]
    assert r["manifest_model"] == r["coco_manifest_model"] == "layout-test"
    assert r["tree"] == sorted([
        "_state/settings.json", "_state/done/part-000000.json", "_state/done/part-000001.json",
        "pq-files/part-000000.parquet", "pq-files/part-000001.parquet",
        "json-files/part-000000.segm.json", "json-files/part-000000.bbox.json",
        "json-files/part-000001.segm.json", "json-files/part-000001.bbox.json",
        "run-manifest.json", "report/eval.json", "report/table.md",
        "report/ar_vs_proposals.svg", "report/recall_vs_iou.svg"])
    assert r["left"] == sorted(["report/eval.json", "report/table.md",
                                "report/ar_vs_proposals.svg", "report/recall_vs_iou.svg"])


def test_evaluation_uses_only_the_stores_public_api():
    """No module of segdist.evaluation imports store internals (classes, private helpers)."""
    allowed = {"segdist.proposals.store": {"open_proposals", "Shard"},
               "segdist.proposals.types": {"ImageProposals"},
               "segdist.proposals": {"layout"}}
    for path in sorted((ROOT / "segdist" / "evaluation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "segdist.proposals"):
                names = {a.name for a in node.names}
                assert names <= allowed.get(node.module, set()), (path.name, node.module, names)


def test_store_shards_are_picklable_and_read_alone(tmp_path):
    gt_dict, props = hard_case(4, n_images=9)
    ids = sorted(props)
    out = tmp_path / "run"
    for i in range(0, len(ids), 3):
        write_chunk(str(out), i // 3, [props[k] for k in ids[i:i + 3]], ["parquet", "coco-json"])
    (out / "manifest.json").write_text(json.dumps({"model": {"name": "m1"}}))
    for uri, known in ((out, True), (out / "coco-json", False)):
        store = open_proposals(str(uri))
        assert store.manifest == {"model": {"name": "m1"}}  # read once, when opening
        shards = store.shards()
        assert len(shards) == len(ids) // 3 + bool(len(ids) % 3)
        got = []
        for shard in shards:
            shard = pickle.loads(pickle.dumps(shard))  # as a Ray task receives it
            assert shard.num_images == (len(shard.read()) if known else None) or not known
            images = shard.read()
            assert [p.image_id for p in images] == sorted(p.image_id for p in images)
            assert all(p.counts is None for p in shard.read(masks=False))
            got += images
        assert [p.image_id for p in got] == ids
        for p in got:  # COCO-JSON has no model name: the manifest's stands in
            assert p.model == ("test" if known else "m1")
            assert p.counts == props[p.image_id].counts
            assert (p.scores == props[p.image_id].scores).all()

