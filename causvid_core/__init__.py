"""causvid_core: streaming, autoregressive video generation with Wan2.1-family causal DiTs.

Never imports ComfyUI. The pieces: config (presets), model (the DiT), cache (KV cache), flow
(sigma/t, x0/flow), sampler (few-step causal rollout), checkpoints (every layout users hold),
parity and bench (proof and numbers), cli (`causvid`).
"""
__version__ = "0.1.0"
