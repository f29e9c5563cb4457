"""Live streaming: a session that makes chunk after chunk until stopped, takes prompts while it runs, and
records what it shows so that it plays at any stop. Transports (ComfyUI routes, `causvid live`) sit on top."""
from .recorder import SegmentRecorder
from .session import LiveChunk, LiveSession, LiveStats, PromptInbox
from .sources import CameraSource, FrameSource, VideoFileSource, WorldSource

__all__ = ["CameraSource", "FrameSource", "LiveChunk", "LiveSession", "LiveStats", "PromptInbox", "SegmentRecorder",
           "VideoFileSource", "WorldSource"]
