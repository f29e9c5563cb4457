#!/usr/bin/env bash
# The main command of the README: videos from the built-in model (trained by our own trainer on
# Shapes World; nothing is downloaded), on the CPU.
#   out/demo_clip.mp4    33 frames, one prompt (a circle: the built-in model draws about a third of its
#                        squares and a quarter of its triangles as circles, see docs/RESULTS.md "Shapes")
#   out/demo_stream.mp4  121 frames streamed chunk by chunk, the prompt changing at frames 41 and 81,
#                        in the model's own rolling KV window (9 latent frames)
# Extra arguments go to both `causvid generate` calls (e.g. --seed 3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CAUSVID_ROOT"
mkdir -p out
causvid generate --prompt "a green circle moving left on a black background" --frames 33 \
  --out out/demo_clip.mp4 "$@"
causvid generate --schedule scripts/demo_schedule.txt --switch-mode recache --frames 121 \
  --out out/demo_stream.mp4 "$@"
