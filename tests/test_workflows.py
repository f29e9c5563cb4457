"""The example workflows: generated from one definition (in sync), and every API graph is valid for
the pack's nodes: known classes, declared inputs, combo values that exist, links of the right type.
(Running them in a real ComfyUI is the end-to-end suite's job.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_workflows as mw  # noqa: E402

PACK = mw.load_pack()
API = sorted((ROOT / "workflows" / "api").glob("*.json"))


def test_files_are_in_sync_with_their_definitions():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_workflows.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p.stem for p in API} == set(mw.WORKFLOWS)
    assert {p.stem for p in (ROOT / "workflows").glob("*.json")} == set(mw.WORKFLOWS)


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_graph_is_valid(path):
    graph = json.loads(path.read_text())
    for nid, node in graph.items():
        ins, _ = mw.node_def(node["class_type"], PACK)
        declared = dict(ins)
        spec = PACK[node["class_type"]].INPUT_TYPES() if node["class_type"] in PACK else None
        for name, value in node["inputs"].items():
            assert name in declared, f"{path.stem}: node {nid} has no input {name!r}"
            if isinstance(value, list):
                src = graph[value[0]]
                _, outs = mw.node_def(src["class_type"], PACK)
                assert outs[value[1]][1] == declared[name], f"{path.stem}: {nid}.{name} gets {outs[value[1]][1]}"
            elif spec and declared[name] == "COMBO":
                options = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
                assert value in options or name == "model_name", f"{path.stem}: {nid}.{name}={value!r}"
        if spec:
            missing = [k for k in spec["required"] if k not in node["inputs"]]
            assert not missing, f"{path.stem}: node {nid} misses {missing}"
    assert any(n["class_type"] == "SaveCausalVideo" for n in graph.values())


def test_ui_files_link_like_their_api_twins():
    for path in API:
        api = json.loads(path.read_text())
        ui = json.loads((ROOT / "workflows" / path.name).read_text())
        assert {n["id"] for n in ui["nodes"]} == {int(k) for k in api}
        refs = sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
        assert len(ui["links"]) == refs
        for link in ui["links"]:
            lid, src, src_slot, dst, dst_slot, t = link
            node = next(n for n in ui["nodes"] if n["id"] == dst)
            assert node["inputs"][dst_slot]["link"] == lid and node["inputs"][dst_slot]["type"] == t
