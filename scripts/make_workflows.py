"""Writes the example workflows: each graph is defined once here in API form, and both files are
generated from it: workflows/api/NAME.json (for /prompt clients) and workflows/NAME.json (the UI
format ComfyUI's "Load" and template browser read: nodes, links, widgets_values).

The graphs for real Wan models (WAN_WORKFLOWS) are written in the UI format only, to workflows/wan/NAME.json,
each with a Note node naming the files to download: they cannot run until those files are in place, so
they have no API twin and are not run by the tests (tests/test_workflows.py checks their graphs).

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
    return {node_id: {"class_type": "LoadCausalModel", "inputs": {
            "model_name": kw.get("name", BUILTIN), "dtype": "auto",
            "frames_per_chunk": 0, "window_frames": kw.get("window", 0), "sink_frames": kw.get("sinks", 0),
            "lora_name": "none", "lora_strength": 1.0, "preset": kw.get("preset", "from the file")}}}


def text(node_id, prompt, model_ref="1"):
    return {node_id: {"class_type": "CausalTextEncode", "inputs": {"model": [model_ref, 0], "text": prompt}}}


def save(node_id, images, prefix):
    return {node_id: {"class_type": "SaveCausalVideo", "inputs": {"images": images, "fps": 16,
                                                                  "filename_prefix": f"causvid/{prefix}"}}}


def state(node_id, length=33, seed=0, model_ref="1", width=64, height=64, vae=None):
    inputs = {"model": [model_ref, 0], "width": width, "height": height, "length": length, "seed": seed}
    if vae is not None:
        inputs["vae"] = vae
    return {node_id: {"class_type": "CausalKVState", "inputs": inputs}}


def sampler(node_id, state_ref, chunks, **more):
    """more: conditioning= or prompt_schedule= (links), steps= (a preset name instead of the model's own)."""
    inputs = {"state": state_ref, "chunks": chunks, "steps": "model default"}
    inputs.update(more)
    return {node_id: {"class_type": "StreamChunkSampler", "inputs": inputs}}


NODE_SIZES = {"LiveStream": (420, 700)}  # room for its widgets and the live player below them


def live(node_id, state_ref, prompt, source, source_input="", strength=0.6):
    return {node_id: {"class_type": "LiveStream", "inputs": {
        "state": state_ref, "prompt": prompt, "mode": "recache", "seconds": 600.0, "source": source,
        "strength": strength, "source_input": source_input, "filename_prefix": "causvid/live"}}}


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
                           "model": ["1", 0], "images": ["4", 0], "conditioning": ["3", 0], "strength": 0.7,
                           "seed": 1, "steps": "model default"}},
                       **save("6", ["5", 0], "video_to_video")},
    "endless_stream": {**model(window=9, sinks=0), **text("2", RED), **state("3", length=0),
                       **sampler("4", ["3", 0], 20, conditioning=["2", 0]), **save("5", ["4", 2], "endless")},
    # live: played in the LiveStream node while it is made; type a prompt there to steer it, Stop to end it
    "live_stream": {**model(window=9, sinks=0), **state("2", length=0), **live("3", ["2", 0], RED, "text")},
    "live_video_to_video": {**model(window=9, sinks=0), **state("2", length=0),
                            **live("3", ["2", 0], BLUE, "shapes world", source_input=RED)},
}
NOTES = {
    "live_stream": ("Queue it and watch the LiveStream node: the stream plays there while it is made. Type a prompt "
                    "in its box (e.g. 'a blue square moving up on a gray background') and press Send: it takes over "
                    "at the next chunk. Stop ends it; the recording and its prompt schedule are in "
                    "output/causvid/live_NNNNN/. It stops by itself after 600 s of video."),
    "live_video_to_video": ("Restyles its input live, shown beside the output: here an endless Shapes World clip of "
                            "a red circle, turned blue by the prompt. Set source to 'camera' to restyle the "
                            "browser's camera, or to 'video file' with a file name from ComfyUI's input folder."),
    "image_to_video": "Its image, yellow_square_navy.png, is put into ComfyUI's input/ folder by the pack itself.",
    "endless_stream": ("Endless stream (length 0) with a rolling KV window of 9 latent frames and no sinks: the context "
                       "the built-in model trained on (two past chunks + the current one). Over ten 30-chunk streams "
                       "colour, background or motion went wrong in 5% of chunks at 9 + 0 (and at 12 + 0), 9% at "
                       "LongLive's 12 + 3 sinks, which suits LongLive's own weights "
                       "(see workflows/wan/prompt_schedule_longlive.json)."),
}

# ---- real Wan2.1 models: UI only, in workflows/wan/ ------------------------------------------------------
# Causal checkpoints distilled from Wan-AI/Wan2.1-T2V-1.3B, with ComfyUI's own Wan text encoder and VAE.
WAN_W, WAN_H = 832, 480  # Wan2.1's 480p size (latent 104x60)
SELF_FORCING = "self_forcing_dmd.pt"
CAUSVID = "autoregressive_checkpoint/model.pt"  # tianweiy/CausVid's folder kept inside models/diffusion_models
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
FOX = ("A red fox trots through fresh snow in a quiet pine forest at dawn, its breath steaming in the cold air, "
       "soft golden light between the trees, cinematic tracking shot, shallow depth of field")


def clip_loader(node_id):
    return {node_id: {"class_type": "CLIPLoader", "inputs": {"clip_name": UMT5, "type": "wan", "device": "default"}}}


def clip_text(node_id, prompt, clip_ref):
    return {node_id: {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": [clip_ref, 0]}}}


def vae_loader(node_id):
    return {node_id: {"class_type": "VAELoader", "inputs": {"vae_name": WAN_VAE}}}


WAN_WORKFLOWS = {
    # Self-Forcing text to video: 7 chunks of 3 latent frames = 81 frames (5 s), the length it was trained on
    "self_forcing_t2v_stream": {**model(name=SELF_FORCING), **clip_loader("2"), **clip_text("3", FOX, "2"),
                                **vae_loader("4"),
                                **state("5", length=81, width=WAN_W, height=WAN_H, vae=["4", 0]),
                                **sampler("6", ["5", 0], 7, conditioning=["3", 0], steps="self-forcing-4step"),
                                **save("7", ["6", 2], "wan/self_forcing_t2v")},
    # LongLive's recipe: rolling window of 12 latent frames with 3 sinks, endless stream, recache switches;
    # 20 chunks = 237 frames; 81 and 165 are chunk starts (9 + 12k), so nothing is snapped
    "prompt_schedule_longlive": {**model(name=SELF_FORCING, window=12, sinks=3), **clip_loader("2"),
                                 **vae_loader("3"),
                                 "4": {"class_type": "PromptSchedule", "inputs": {
                                     "schedule": (f"0: {FOX}\n"
                                                  "81: The red fox stops and looks up as heavy snow begins to fall, "
                                                  "blue evening light in the pine forest, cinematic tracking shot\n"
                                                  "165: The red fox curls up to sleep under a snow-covered pine at "
                                                  "night, moonlight on the snow, slow push-in, cinematic\n"),
                                     "mode": "recache", "blend_chunks": 2, "clip": ["2", 0]}},
                                 **state("5", length=0, width=WAN_W, height=WAN_H, vae=["3", 0]),
                                 **sampler("6", ["5", 0], 20, prompt_schedule=["4", 0], steps="self-forcing-4step"),
                                 **save("7", ["6", 2], "wan/longlive_schedule")},
    # CausVid image to video with its text-to-video model: the image is held clean as the first latent frame
    "image_to_video_causvid": {**model(name=CAUSVID), **clip_loader("2"),
                               **clip_text("3", "The scene comes to life: gentle natural motion, the camera slowly "
                                                "pushes in, soft light, cinematic, high detail", "2"),
                               **vae_loader("4"),
                               "5": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
                               "6": {"class_type": "ImageScale", "inputs": {
                                   "image": ["5", 0], "upscale_method": "lanczos", "width": WAN_W, "height": WAN_H,
                                   "crop": "center"}},
                               **state("7", length=81, width=WAN_W, height=WAN_H, vae=["4", 0]),
                               "8": {"class_type": "CausalImageToVideo", "inputs": {"state": ["7", 0],
                                                                                    "image": ["6", 0]}},
                               **sampler("9", ["8", 0], 7, conditioning=["3", 0], steps="causvid-3step"),
                               **save("10", ["9", 2], "wan/causvid_i2v")},
}

# What each Wan graph needs: (models/ folder, file, size, where to get it). Sizes from parameter counts
# (shared/parity/wan_manifests.json: DiT 1,418,996,800, VAE 126,892,531 -> 254 MB in 16 bits; umT5-XXL encoder
# by shared/reference's config: 1.05B embedding + 4.63B in the blocks -> 11.4 GB in fp16, 6.7 GB with the
# blocks in fp8). The causal .pt files hold several copies of the DiT (shared/reference, section 5).
WAN_FILES = {
    SELF_FORCING: ("diffusion_models", SELF_FORCING,
                   "several GB: the generator, its EMA and the critic, 1.4B parameters each; "
                   "the EMA generator is used",
                   "gdhe17/Self-Forcing on Hugging Face, file checkpoints/self_forcing_dmd.pt "
                   "(code: guandeh17/Self-Forcing)"),
    CAUSVID: ("diffusion_models", CAUSVID,
              "several GB: the generator and the critic, 1.4B parameters each; the generator is used",
              "tianweiy/CausVid on Hugging Face: keep its folder, i.e. "
              "models/diffusion_models/autoregressive_checkpoint/model.pt"),
    UMT5: ("text_encoders", UMT5, "about 6.7 GB",
           "Comfy-Org/Wan_2.1_ComfyUI_repackaged, folder split_files/text_encoders; umt5_xxl_fp16.safetensors "
           "(about 11 GB, same place) works too: pick it in CLIPLoader"),
    WAN_VAE: ("vae", WAN_VAE, "about 250 MB", "Comfy-Org/Wan_2.1_ComfyUI_repackaged, folder split_files/vae"),
}
WAN_INTRO = {
    "self_forcing_t2v_stream": (
        "Self-Forcing text to video on Wan2.1 1.3B, streamed chunk by chunk: 832x480, 81 frames (5 s at 16 fps), "
        "4 steps per chunk. Self-Forcing was trained on 81-frame clips; for longer streams see "
        "prompt_schedule_longlive.json (rolling window). It likes long, detailed prompts."),
    "prompt_schedule_longlive": (
        "Prompts that change over time, LongLive style: a rolling KV window of 12 latent frames with 3 sink frames "
        "(LoadCausalModel), an endless stream (length 0 on CausalKVState) and recache switches (the recent frames "
        "are re-encoded under the new prompt). 20 chunks = 237 frames (15 s); the prompt changes at frames 81 and "
        "165. Raise chunks for more.\n"
        "It runs the Self-Forcing checkpoint. LongLive's own weights (Efficient-Large-Model/LongLive-1.3B: "
        "models/longlive_base.pt plus models/lora.pt) are a base and a LoRA, and LoadCausalModel takes one file: "
        "merge them once, with ComfyUI's Python, from this pack's folder (custom_nodes/causvid-stream), giving "
        "the paths of the two files:\n"
        "  python -c \"from causvid_core.checkpoints import load_dit, save_dit; "
        "save_dit(load_dit('PATH/longlive_base.pt', lora='PATH/lora.pt'), 'longlive.safetensors')\"\n"
        "then put longlive.safetensors in models/diffusion_models and pick it in LoadCausalModel."),
    "image_to_video_causvid": (
        "Image to video with CausVid: your image (scaled and center-cropped to 832x480 by ImageScale) becomes the "
        "first latent frame, held clean while the first chunk is made, and the stream goes on from it; 81 frames, "
        "3 steps per chunk. This uses CausVid's text-to-video model (1.3B). The Wan2.1 image-to-video models "
        "(Wan-AI/Wan2.1-I2V-14B-480P) are not needed and do not run in these nodes (their extra image channels and "
        "CLIP-vision input are not supported). self_forcing_dmd.pt works here too (steps: self-forcing-4step). "
        "Pick your own image in LoadImage (example.png is ComfyUI's sample)."),
}


def wan_note(name: str, api: dict) -> str:
    """The Note node's text: what the graph does, every file it names and where it goes, the GPU."""
    named = [v for n in api.values() for k, v in n["inputs"].items() if k in ("model_name", "clip_name", "vae_name")]
    lines = [WAN_INTRO[name], "", "FILES TO DOWNLOAD, into ComfyUI/models/:"]
    for i, f in enumerate(named, 1):
        folder, file, size, source = WAN_FILES[f]
        lines += [f"{i}. {folder}/{file} ({size})", f"   from {source}"]
    lines += ["These causal models are distilled from Wan-AI/Wan2.1-T2V-1.3B; Wan's own DiT is not needed here.",
              "Restart ComfyUI (or refresh the page) so the loaders list the files; pick them there if the names "
              "differ.",
              "",
              "NEEDS A GPU: a CUDA GPU, used automatically (bfloat16); Self-Forcing was tested on 24 GB cards. On a "
              "CPU one video takes hours."]
    return "\n".join(lines)


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
    "ImageScale": ([("image", "IMAGE"), ("upscale_method", "COMBO"), ("width", "INT"), ("height", "INT"),
                    ("crop", "COMBO")], [("IMAGE", "IMAGE")]),
    "CLIPLoader": ([("clip_name", "COMBO"), ("type", "COMBO"), ("device", "COMBO")], [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("text", "STRING"), ("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "VAELoader": ([("vae_name", "COMBO")], [("VAE", "VAE")]),
}
NOTE_NODE = "Note"  # the frontend's text note: UI files only, never sent to the server
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
            "id": int(nid), "type": node["class_type"], "pos": [40 + 340 * col, 40 + 260 * row],
            "size": list(NODE_SIZES.get(node["class_type"], (300, 200))),
            "flags": {}, "order": depth[nid], "mode": 0,
            "inputs": in_list,
            "outputs": [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"causvid": {"note": NOTES.get("", "")}}, "version": 0.4}


def with_note(ui: dict, text: str) -> dict:
    """A Note node across the top of the graph (the other nodes move down below it): read first."""
    height = 40 + 22 * sum(1 + len(line) // 110 for line in text.splitlines())
    for node in ui["nodes"]:
        node["pos"][1] += height + 40
    width = max(n["pos"][0] for n in ui["nodes"]) + 300 - 40
    note_id = ui["last_node_id"] + 1
    ui["nodes"].insert(0, {"id": note_id, "type": NOTE_NODE, "pos": [40, 40], "size": [width, height], "flags": {},
                           "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                           "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = note_id
    return ui


def render_all(pack: dict) -> dict[Path, str]:
    files = {}
    for name, api in WORKFLOWS.items():
        ui = to_ui(api, pack)
        ui["extra"] = {"causvid": {"note": NOTES.get(name, "Runs on a CPU with only the built-in model.")}}
        files[ROOT / "workflows" / "api" / f"{name}.json"] = json.dumps(api, indent=2) + "\n"
        files[ROOT / "workflows" / f"{name}.json"] = json.dumps(ui, indent=2) + "\n"
    for name, api in WAN_WORKFLOWS.items():
        ui = with_note(to_ui(api, pack), wan_note(name, api))
        ui["extra"] = {"causvid": {"note": "Real Wan2.1 models: download the files the Note names; needs a GPU."}}
        files[ROOT / "workflows" / "wan" / f"{name}.json"] = json.dumps(ui, indent=2) + "\n"
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
