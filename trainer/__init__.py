"""trainer: the CausVid training recipe (teacher, ODE pairs, ODE init, asymmetric DMD), `causvid-train`.

Depends on causvid_core, never on ComfyUI.
"""
