"""ComfyUI adapters (V1 node API): thin classes over causvid_core. Imported only by the pack's root
__init__.py through relative imports, never as a top-level `nodes` package (ComfyUI has one)."""
from .live_nodes import LiveStream
from .model_nodes import CausalModelFromComfy, CausalTextEncode, LoadCausalModel
from .stream_nodes import CausalImageToVideo, CausalKVState, PromptSchedule, StreamChunkSampler
from .video_nodes import CausalDecodeStream, CausalGenerate, SaveCausalVideo, VideoToVideoStream

_NODES = {
    "LoadCausalModel": (LoadCausalModel, "Load Causal Model (CausVid)"),
    "CausalModelFromComfy": (CausalModelFromComfy, "Causal Model from MODEL (ComfyUI's Wan)"),
    "CausalTextEncode": (CausalTextEncode, "Causal Text Encode (built-in)"),
    "CausalKVState": (CausalKVState, "Causal KV State"),
    "CausalImageToVideo": (CausalImageToVideo, "Causal Image to Video"),
    "PromptSchedule": (PromptSchedule, "Prompt Schedule"),
    "StreamChunkSampler": (StreamChunkSampler, "Stream Chunk Sampler"),
    "VideoToVideoStream": (VideoToVideoStream, "Video to Video (Stream)"),
    "CausalGenerate": (CausalGenerate, "Causal Generate (one node)"),
    "CausalDecodeStream": (CausalDecodeStream, "Causal Decode (Streaming)"),
    "SaveCausalVideo": (SaveCausalVideo, "Save Video (MP4)"),
    "LiveStream": (LiveStream, "Live Stream (play, steer, record)"),
}
NODE_CLASS_MAPPINGS = {k: v[0] for k, v in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v[1] for k, v in _NODES.items()}


def register_routes() -> None:
    """The live player's routes on ComfyUI's server (they must exist before ComfyUI builds its app, which it
    does after importing the custom nodes). Outside a ComfyUI server (tests, scripts) there is none."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is not None:
        from . import host

        host.live_hub()


def install_example_inputs() -> None:
    """Put the example workflows' input files (workflows/assets/) into ComfyUI's input folder, once, so a
    shipped workflow that loads one (image_to_video.json's LoadImage) runs as it is loaded. A file of the
    same name that is already there is left alone."""
    import shutil
    from pathlib import Path

    try:
        import folder_paths
        target = Path(folder_paths.get_input_directory())
    except Exception:  # not inside ComfyUI
        return
    for asset in (Path(__file__).resolve().parents[1] / "workflows" / "assets").glob("*.png"):
        dest = target / asset.name
        if not dest.exists():
            try:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(asset, dest)
            except OSError as exc:  # a read-only input folder: the workflow then asks for the file
                print(f"[causvid] could not copy {asset.name} into {target}: {exc}")
