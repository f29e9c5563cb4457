"""Prompt schedules: `FRAME: prompt` lines in pixel frames, snapped to chunk boundaries.

A schedule file, one line per prompt change:

    0: a red circle moving right on a black background
    45: a blue circle moving right on a black background

Blank lines and lines starting with `#` are ignored. Frames are pixel frames (16 per second); a
change can only happen where a chunk starts, so each frame is snapped to the nearest chunk start
and a notice says so. The first line must be frame 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

SWITCH_MODES = ("cut", "recache", "blend")
_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


@dataclass(frozen=True)
class PromptEvent:
    frame: int  # pixel frame where the prompt starts (after snapping: a chunk start)
    prompt: str


class ScheduleError(ValueError):
    pass


def parse_schedule(text: str) -> list[PromptEvent]:
    events: list[PromptEvent] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ScheduleError(f"schedule line {n}: expected 'FRAME: prompt', got {line.strip()!r}")
        frame, prompt = int(m.group(1)), m.group(2)
        if not prompt:
            raise ScheduleError(f"schedule line {n}: the prompt after '{frame}:' is empty")
        if events and frame <= events[-1].frame:
            raise ScheduleError(f"schedule line {n}: frame {frame} is not after frame {events[-1].frame}")
        if not events and frame != 0:
            raise ScheduleError(f"schedule line {n}: the first prompt must start at frame 0, not {frame}")
        events.append(PromptEvent(frame, prompt))
    if not events:
        raise ScheduleError("the schedule is empty: give at least one line '0: prompt'")
    return events


def latent_to_pixel(latent_frame: int, time_factor: int = 4) -> int:
    """First pixel frame of a latent frame: latent 0 is one pixel frame, each later one `time_factor`."""
    return 0 if latent_frame == 0 else time_factor * latent_frame - (time_factor - 1)


def chunk_starts(chunk_layout: Sequence[int]) -> list[int]:
    """Latent start frame of each chunk of a layout such as [3, 3, 3] or [1, 3, 3]."""
    starts, s = [], 0
    for n in chunk_layout:
        starts.append(s)
        s += n
    return starts


def snap_schedule(events: Sequence[PromptEvent], chunk_layout: Sequence[int], time_factor: int = 4
                  ) -> tuple[dict[int, str], list[str]]:
    """Map events to chunk indices: {chunk index: prompt} and notices for every moved frame."""
    starts = [latent_to_pixel(s, time_factor) for s in chunk_starts(chunk_layout)]
    by_chunk: dict[int, str] = {}
    notices = []
    for ev in events:
        c = min(range(len(starts)), key=lambda i: (abs(starts[i] - ev.frame), i))
        if starts[c] != ev.frame:
            notices.append(f"schedule: frame {ev.frame} snapped to frame {starts[c]}, the nearest chunk start")
        if c in by_chunk:
            notices.append(f"schedule: {by_chunk[c]!r} at chunk {c} is replaced by {ev.prompt!r} "
                           "(both snap to the same chunk start)")
        by_chunk[c] = ev.prompt
    return by_chunk, notices
