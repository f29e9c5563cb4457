"""Live streaming: a session that makes chunk after chunk until stopped, takes prompts while it runs, and
records what it shows so that it plays at any stop. Transports (ComfyUI routes, `causvid live`) sit on top."""
from .recorder import SegmentRecorder
from .session import LiveSession, LiveStats, PromptInbox

__all__ = ["LiveSession", "LiveStats", "PromptInbox", "SegmentRecorder"]
