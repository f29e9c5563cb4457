"""ComfyUI adapters (V1 node API): thin classes over causvid_core. Imported only by the pack's root
__init__.py through relative imports, never as a top-level `nodes` package (ComfyUI has one)."""
from .model_nodes import CausalTextEncode, LoadCausalModel
from .stream_nodes import CausalImageToVideo, CausalKVState, PromptSchedule, StreamChunkSampler
from .video_nodes import CausalDecodeStream, CausalGenerate, SaveCausalVideo, VideoToVideoStream

_NODES = {
    "LoadCausalModel": (LoadCausalModel, "Load Causal Model (CausVid)"),
    "CausalTextEncode": (CausalTextEncode, "Causal Text Encode (built-in)"),
    "CausalKVState": (CausalKVState, "Causal KV State"),
    "CausalImageToVideo": (CausalImageToVideo, "Causal Image to Video"),
    "PromptSchedule": (PromptSchedule, "Prompt Schedule"),
    "StreamChunkSampler": (StreamChunkSampler, "Stream Chunk Sampler"),
    "VideoToVideoStream": (VideoToVideoStream, "Video to Video (Stream)"),
    "CausalGenerate": (CausalGenerate, "Causal Generate (one node)"),
    "CausalDecodeStream": (CausalDecodeStream, "Causal Decode (Streaming)"),
    "SaveCausalVideo": (SaveCausalVideo, "Save Video (MP4)"),
}
NODE_CLASS_MAPPINGS = {k: v[0] for k, v in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: v[1] for k, v in _NODES.items()}
