"""The example workflows: generated from one definition (in sync), and every API graph is valid for
the pack's nodes: known classes, declared inputs, combo values that exist, links of the right type.
(Running them in a real ComfyUI is the end-to-end suite's job.)

workflows/wan/ holds UI-only graphs for real Wan models (no API twin: they need downloaded files): each is
read back into API form and checked the same way, its links against both ends, and its Note against the
files it names."""
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
WAN = sorted((ROOT / "workflows" / "wan").glob("*.json"))


def test_files_are_in_sync_with_their_definitions():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_workflows.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p.stem for p in API} == set(mw.WORKFLOWS)
    assert {p.stem for p in (ROOT / "workflows").glob("*.json")} == set(mw.WORKFLOWS)
    assert {p.stem for p in WAN} == set(mw.WAN_WORKFLOWS)  # UI only: no api twin


def check_graph(name: str, graph: dict) -> None:
    """An API-form graph is valid for the pack's nodes and the core nodes the examples use."""
    for nid, node in graph.items():
        assert node["class_type"] in PACK or node["class_type"] in mw.CORE_NODES, f"{name}: {node['class_type']}"
        ins, _ = mw.node_def(node["class_type"], PACK)
        declared = dict(ins)
        spec = PACK[node["class_type"]].INPUT_TYPES() if node["class_type"] in PACK else None
        options = {**spec.get("required", {}), **spec.get("optional", {})} if spec else {}
        for key, value in node["inputs"].items():
            assert key in declared, f"{name}: node {nid} has no input {key!r}"
            if isinstance(value, list):
                src = graph[value[0]]
                _, outs = mw.node_def(src["class_type"], PACK)
                assert outs[value[1]][1] == declared[key], f"{name}: {nid}.{key} gets {outs[value[1]][1]}"
            elif spec and declared[key] == "COMBO":
                assert value in options[key][0] or key == "model_name", f"{name}: {nid}.{key}={value!r}"
            elif spec and declared[key] in ("INT", "FLOAT"):
                lim = options[key][1]
                assert lim.get("min", value) <= value <= lim.get("max", value), f"{name}: {nid}.{key}={value}"
        if spec:
            missing = [k for k in spec["required"] if k not in node["inputs"]]
            assert not missing, f"{name}: node {nid} misses {missing}"
    assert any(n["class_type"] in ("SaveCausalVideo", "LiveStream") for n in graph.values())


@pytest.mark.parametrize("path", API, ids=lambda p: p.stem)
def test_api_graph_is_valid(path):
    check_graph(path.stem, json.loads(path.read_text()))


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


def ui_to_api(ui: dict) -> dict:
    """Read a UI-format graph back into API form, as the frontend's graphToPrompt does for these nodes:
    widgets_values by the declared widget inputs (seeds followed by their control value), sockets by links."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] == mw.NOTE_NODE:
            continue
        ins, _ = mw.node_def(node["type"], PACK)
        widgets = iter(node["widgets_values"])
        inputs = {}
        for key, t in ins:
            if t == "IMAGEUPLOAD":
                assert next(widgets) == "image"
            elif t in mw.WIDGET_TYPES:
                inputs[key] = next(widgets)
                if key == "seed":
                    assert next(widgets) in ("fixed", "increment", "decrement", "randomize")
        assert next(widgets, None) is None, f"node {node['id']}: more widgets_values than widget inputs"
        for socket in node["inputs"]:
            if socket["link"] is not None:
                _, src, src_slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(src), src_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("path", WAN, ids=lambda p: p.stem)
def test_wan_ui_graph_is_valid(path):
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and ui["groups"] == [] and isinstance(ui["extra"], dict)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    assert [link[0] for link in ui["links"]] == list(range(1, ui["last_link_id"] + 1))
    for node in ui["nodes"]:
        assert node["type"] in PACK or node["type"] in mw.CORE_NODES or node["type"] == mw.NOTE_NODE, node["type"]
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(node)
        if node["type"] == mw.NOTE_NODE:
            assert node["inputs"] == node["outputs"] == [] and len(node["widgets_values"]) == 1
            continue
        ins, outs = mw.node_def(node["type"], PACK)
        sockets = [(k, t) for k, t in ins if t not in mw.WIDGET_TYPES]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets, node["type"]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == outs, node["type"]
    for lid, src, src_slot, dst, dst_slot, t in ui["links"]:  # both ends agree with the link and its type
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert lid in out["links"] and out["type"] == t, f"link {lid}: source {out}"
        assert inp["link"] == lid and inp["type"] == t, f"link {lid}: target {inp}"
    used = {lid for n in ui["nodes"] for o in n["outputs"] for lid in o["links"]}
    assert used == {i["link"] for n in ui["nodes"] for i in n["inputs"] if i["link"] is not None} == set(
        range(1, ui["last_link_id"] + 1))

    api = ui_to_api(ui)
    assert api == mw.WAN_WORKFLOWS[path.stem]  # the file says what the definition says
    check_graph(path.stem, api)
    for node in api.values():
        if node["class_type"] in PACK:  # every required socket of our nodes is connected
            spec = PACK[node["class_type"]].INPUT_TYPES()["required"]
            assert all(k in node["inputs"] for k in spec), node
    assert all(n["inputs"]["type"] == "wan" for n in api.values() if n["class_type"] == "CLIPLoader")
    kv = [n["inputs"] for n in api.values() if n["class_type"] == "CausalKVState"]
    assert kv and all((s["width"], s["height"]) == (832, 480) and "vae" in s for s in kv)


@pytest.mark.parametrize("path", WAN, ids=lambda p: p.stem)
def test_wan_note_names_every_file(path):
    ui = json.loads(path.read_text())
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == mw.NOTE_NODE]
    assert len(notes) == 1
    note = notes[0]
    folders = {"model_name": "diffusion_models", "clip_name": "text_encoders", "vae_name": "vae"}
    named = [(k, v) for n in ui_to_api(ui).values() for k, v in n["inputs"].items() if k in folders]
    assert {k for k, _ in named} == set(folders)
    for key, file in named:
        assert f"{folders[key]}/{file}" in note, f"the note does not say where {file} goes"
    for source in ("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "Wan-AI/Wan2.1-T2V-1.3B", "GPU"):
        assert source in note
    assert "gdhe17/Self-Forcing" in note or "tianweiy/CausVid" in note
