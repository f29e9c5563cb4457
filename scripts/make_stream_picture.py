"""Writes docs/stream.png, the README's picture of a stream: frames of the built-in model's stream under
scripts/demo_schedule.txt (the prompt changes at frames 41 and 81), every 8th frame, 2x, in rows of 8.

    python scripts/make_stream_picture.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from causvid_core.pipeline import load_components
from causvid_core.schedule import parse_schedule, snap_schedule
from causvid_core.stream import CausalStream, StreamSettings, run_schedule
from causvid_core.video_io import frames_uint8

ROOT = Path(__file__).resolve().parents[1]
FRAMES, EVERY, PER_ROW, SCALE = 121, 8, 8, 2


def main() -> None:
    comps = load_components()
    settings = StreamSettings.from_fields({**comps.stream_defaults, "max_frames": None, "switch_mode": "recache"})
    stream = CausalStream(comps.model, settings, latent_hw=(8, 8), vae=comps.vae, text_encoder=comps.text_encoder)
    events = parse_schedule((ROOT / "scripts" / "demo_schedule.txt").read_text())
    chunks = 1 + -(-(FRAMES - 9) // 12)
    by_chunk, _ = snap_schedule(events, [settings.chunk_size(i) for i in range(chunks)])
    with torch.no_grad():
        video = torch.cat([frames_uint8(c.frames) for c in run_schedule(stream, by_chunk, count=chunks,
                                                                            mode="recache")]).numpy()
    picks = list(range(0, FRAMES, EVERY))[:2 * PER_ROW]
    size = 64 * SCALE
    sheet = Image.new("RGB", (PER_ROW * (size + 4), (len(picks) // PER_ROW) * (size + 18)), (17, 17, 17))
    draw = ImageDraw.Draw(sheet)
    for i, f in enumerate(picks):
        x, y = (i % PER_ROW) * (size + 4), (i // PER_ROW) * (size + 18)
        sheet.paste(Image.fromarray(video[f]).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 2, y + size + 2), f"frame {f}", fill=(200, 200, 200))
    sheet.save(ROOT / "docs" / "stream.png", optimize=True)
    print(f"wrote docs/stream.png ({len(picks)} frames)")


if __name__ == "__main__":
    main()
