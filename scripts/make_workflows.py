"""Writes the example workflows: each graph is defined once here in API form, and both files are
generated from it: workflows/api/NAME.json (for /prompt clients) and workflows/NAME.json (the UI
format ComfyUI's "Load" and template browser read: nodes, links, widgets_values).

    python scripts/make_workflows.py          # rewrite the files
    python scripts/make_workflows.py --check  # exit 1 if the files differ from these definitions (tested)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = "built-in: Shapes World (CPU)"
RED = "a red circle moving right on a black background"
BLUE = "a blue circle moving right on a black background"


def model(node_id="1", **kw):
    return {node_id: {"class_type": "LoadCausalModel", "inputs": {"model_name": BUILTIN, "dtype": "auto",
            "frames_per_chunk": 0, "window_frames": kw.get("window", 0), "sink_frames": kw.get("sinks", 0)}}}


def text(node_id, prompt, model_ref="1"):
    return {node_id: {"class_type": "CausalTextEncode", "inputs": {"model": [model_ref, 0], "text": prompt}}}


def save(node_id, images, prefix):
    return {node_id: {"class_type": "SaveCausalVideo", "inputs": {"images": images, "fps": 16,
                                                                  "filename_prefix": f"causvid/{prefix}"}}}


def state(node_id, length=33, seed=0, model_ref="1"):
    return {node_id: {"class_type": "CausalKVState", "inputs": {"model": [model_ref, 0], "width": 64, "height": 64,
                                                                "length": length, "seed": seed}}}


def sampler(node_id, state_ref, chunks, **cond):
    inputs = {"state": state_ref, "chunks": chunks, "steps": "model default"}
    inputs.update(cond)
    return {node_id: {"class_type": "StreamChunkSampler", "inputs": inputs}}


WORKFLOWS = {
    # the simplest graph, on the built-in model: runs on a CPU with nothing downloaded
    "builtin_demo": {**model(), **text("2", RED),
                     "3": {"class_type": "CausalGenerate", "inputs": {
                         "model": ["1", 0], "conditioning": ["2", 0], "width": 64, "height": 64, "length": 33,
                         "seed": 0, "steps": "model default"}},
                     **save("4", ["3", 0], "builtin_demo")},
    "text_to_video_stream": {**model(), **text("2", RED), **state("3", length=33),
                             **sampler("4", ["3", 0], 3, conditioning=["2", 0]), **save("5", ["4", 2], "t2v_stream")},
    "chunk_chain": {**model(), **text("2", RED), **state("3", length=33),
                    **sampler("4", ["3", 0], 1, conditioning=["2", 0]),
                    **sampler("5", ["4", 0], 2, conditioning=["2", 0]),
                    "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 2], "image2": ["5", 2]}},
                    **save("7", ["6", 0], "chunk_chain")},
    "prompt_schedule": {**model(),
                        "2": {"class_type": "PromptSchedule", "inputs": {
                            "schedule": f"0: {RED}\n45: {BLUE}\n", "mode": "recache", "blend_chunks": 2,
                            "model": ["1", 0]}},
                        **state("3", length=81), **sampler("4", ["3", 0], 7, prompt_schedule=["2", 0]),
                        **save("5", ["4", 2], "prompt_schedule")},
    "image_to_video": {**model(), **text("2", "a yellow square moving left on a navy background"),
                       **state("3", length=33),
                       "4": {"class_type": "LoadImage", "inputs": {"image": "yellow_square_navy.png"}},
                       "5": {"class_type": "CausalImageToVideo", "inputs": {"state": ["3", 0], "image": ["4", 0]}},
                       **sampler("6", ["5", 0], 3, conditioning=["2", 0]), **save("7", ["6", 2], "image_to_video")},
    "video_to_video": {**model(), **text("2", RED), **text("3", BLUE),
                       "4": {"class_type": "CausalGenerate", "inputs": {
                           "model": ["1", 0], "conditioning": ["2", 0], "width": 64, "height": 64, "length": 33,
                           "seed": 0, "steps": "model default"}},
                       "5": {"class_type": "VideoToVideoStream", "inputs": {
                           "model": ["1", 0], "images": ["4", 0], "conditioning": ["3", 0], "strength": 0.6,
                           "seed": 1, "steps": "model default"}},
                       **save("6", ["5", 0], "video_to_video")},
    "endless_stream": {**model(window=12, sinks=3), **text("2", RED), **state("3", length=0),
                       **sampler("4", ["3", 0], 20, conditioning=["2", 0]), **save("5", ["4", 2], "endless")},
}
NOTES = {
    "image_to_video": "Copy workflows/assets/yellow_square_navy.png into ComfyUI's input/ folder first.",
}


def load_pack():
    """The pack's node classes (ComfyUI's host modules stubbed: only INPUT_TYPES is read)."""
    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda folder: []
    sys.modules.setdefault("folder_paths", fp)
    spec = importlib.util.spec_from_file_location("causvid_pack_wf", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["causvid_pack_wf"] = mod
    spec.loader.exec_module(mod)
    return mod.NODE_CLASS_MAPPINGS


CORE_NODES = {  # the ComfyUI core nodes the examples use: (inputs in order, widget inputs, outputs)
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "LoadImage": ([("image", "COMBO"), ("upload", "IMAGEUPLOAD")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def node_def(cls_name: str, pack: dict):
    """[(input name, type)], [(output name, type)] in ComfyUI's order."""
    if cls_name in CORE_NODES:
        return CORE_NODES[cls_name]
    cls = pack[cls_name]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            t = decl[0]
            inputs.append((name, "COMBO" if isinstance(t, list) else t))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return inputs, list(zip(names, cls.RETURN_TYPES))


def to_ui(api: dict, pack: dict) -> dict:
    """The UI-format graph: nodes laid out left to right by depth, links from the API references."""
    depth: dict[str, int] = {}

    def d(nid: str) -> int:
        if nid not in depth:
            refs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(r) for r in refs), default=-1)
        return depth[nid]

    for nid in api:
        d(nid)
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        ins, _ = node_def(node["class_type"], pack)
        for slot, (name, t) in enumerate([i for i in ins if i[1] not in WIDGET_TYPES]):
            v = node["inputs"].get(name)
            if isinstance(v, list):
                link_id = len(links) + 1
                links.append([link_id, int(v[0]), v[1], int(nid), slot, t])
                out_links.setdefault((v[0], v[1]), []).append(link_id)
    for nid, node in sorted(api.items(), key=lambda kv: int(kv[0])):
        ins, outs = node_def(node["class_type"], pack)
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        sockets = [i for i in ins if i[1] not in WIDGET_TYPES]
        widgets = []
        for name, t in ins:
            if t in WIDGET_TYPES or t == "IMAGEUPLOAD":
                if t == "IMAGEUPLOAD":
                    widgets.append("image")
                    continue
                widgets.append(node["inputs"].get(name))
                if name == "seed":
                    widgets.append("fixed")  # the frontend's control_after_generate value
        in_list = []
        for slot, (name, t) in enumerate(sockets):
            v = node["inputs"].get(name)
            link = next((l[0] for l in links if l[3] == int(nid) and l[4] == slot), None)
            if v is None and link is None and name in ("vae", "clip", "model", "conditioning", "prompt_schedule"):
                in_list.append({"name": name, "type": t, "link": None, "shape": 7})
            else:
                in_list.append({"name": name, "type": t, "link": link})
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": [40 + 340 * col, 40 + 260 * row], "size": [300, 200],
            "flags": {}, "order": depth[nid], "mode": 0,
            "inputs": in_list,
            "outputs": [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"causvid": {"note": NOTES.get("", "")}}, "version": 0.4}


def render_all(pack: dict) -> dict[Path, str]:
    files = {}
    for name, api in WORKFLOWS.items():
        ui = to_ui(api, pack)
        ui["extra"] = {"causvid": {"note": NOTES.get(name, "Runs on a CPU with only the built-in model.")}}
        files[ROOT / "workflows" / "api" / f"{name}.json"] = json.dumps(api, indent=2) + "\n"
        files[ROOT / "workflows" / f"{name}.json"] = json.dumps(ui, indent=2) + "\n"
    return files


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    files = render_all(load_pack())
    stale = [f for f, text in files.items() if not f.exists() or f.read_text() != text]
    if args.check:
        for f in stale:
            print(f"stale: {f.relative_to(ROOT)} (run python scripts/make_workflows.py)")
        return 1 if stale else 0
    for f, text in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
