"""One place where user-facing inputs are checked: numbers finite and in range, sizes within what memory can
hold, files of the kind expected, text that decodes, output paths that are safe to write. Each check raises an
InputError whose message is one line naming the input and what to do; the CLIs print it and exit 2.

NaN or Inf in what a stream makes is a runtime failure (exit 1): `check_finite_chunk` stops the stream and
names the likely cause instead of letting a black or noise video be written.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

MAX_TIMESTEP = 1000.0  # the models' timestep range is [0, 1000]
MEMORY_FRACTION = 0.8  # a run whose estimate passes this share of the machine's memory needs --allow-large


class InputError(ValueError):
    """A bad user input; the message names it and the fix."""


class NonFiniteError(RuntimeError):
    """NaN or Inf in a stream's latents or frames."""


def finite_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                  low_open: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with low_open)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise InputError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and v > high:
        raise InputError(f"{name} must be <= {high:g}, got {value!r}")
    return v


def check_steps(steps: Iterable[float], name: str = "--steps") -> list[float]:
    """Denoising timesteps: finite, in (0, 1000] but for a final 0 (Krea's last step), strictly decreasing."""
    out = [finite_number(f"{name} value", t, low=0.0, high=MAX_TIMESTEP) for t in steps]
    if not out:
        raise InputError(f"{name} is empty: give timesteps like 1000,750,500 or a preset")
    if out[0] <= 0:
        raise InputError(f"{name} starts at {out[0]:g}: the first step must be above 0 (e.g. 1000)")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise InputError(f"{name} must decrease strictly, got {','.join(f'{t:g}' for t in out)}")
    if any(t == 0 for t in out[:-1]):
        raise InputError(f"{name}: only the last step may be 0")
    return out


def check_size(width: int, height: int, multiple: int, name: str = "--width/--height") -> None:
    for what, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0:
            raise InputError(f"{name}: the {what} must be a positive whole number of pixels, got {v!r}")
        if v % multiple:
            raise InputError(f"{name}: the {what} must be a multiple of {multiple}, got {v} (try "
                             f"{max(multiple, round(v / multiple) * multiple)})")


def physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, what: str, allow_large: bool, device: torch.device | str = "cpu") -> None:
    """Refuse a run whose estimated memory does not fit the machine (or the GPU), unless allowed."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        total, where = torch.cuda.get_device_properties(dev).total_memory, "the GPU's memory"
    else:
        total, where = physical_memory(), "this machine's memory"
    if allow_large or total is None or needed <= MEMORY_FRACTION * total:
        return
    raise InputError(f"{what} needs about {needed / 2 ** 30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of {where} "
                     f"({total / 2 ** 30:.1f} GiB): make it smaller, or pass --allow-large to try anyway")


def read_text(path: str | Path, what: str) -> str:
    """A text file (UTF-8, with or without a byte-order mark); an error names the file and the line."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p}: no such file")
    if not p.is_file():
        raise InputError(f"{what} {p} is not a regular file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{what} {p}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file "
                         "as UTF-8") from None


def check_output(path: str | Path, what: str = "--out") -> Path:
    """Before any work: the output may be created or replaced (a regular file), in a writable folder."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if p.is_dir():
            raise InputError(f"{what} {p} is a folder: give a file name, e.g. {p / 'video.mp4'}")
        mode = os.stat(p).st_mode if p.exists() else 0
        if not stat.S_ISREG(mode):
            raise InputError(f"{what} {p} exists and is not a regular file (a device, pipe or socket): "
                             "choose another path")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{what} {p}: {parent} is not a folder")
    _check_writable(parent, p, what)
    return p


def check_output_dir(path: str | Path, what: str = "--out-dir") -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p} exists and is not a folder: choose a folder path")
    _check_writable(p, p, what)
    return p


def _check_writable(folder: Path, target: Path, what: str) -> None:
    """The nearest existing folder on the way to `folder` must let us create what is missing."""
    existing = next((a for a in [folder, *folder.parents] if a.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {target}: the folder {existing} is not writable: choose another place")


def _unreadable(t: Tensor) -> bool:
    """Tensors whose values cannot be read: meta, or fake (causvid_core/fakedevice.py's stand-in for a GPU)."""
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:
        return False
    return is_fake(t)


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf (one host sync on a GPU); True for tensors without values to read. A real tensor is read
    outside any fake-tensor mode that is active (the GPU harness of fakedevice.py)."""
    if _unreadable(t):
        return True
    from .flow import _real_cpu

    with _real_cpu():
        if t.dtype.itemsize == 1 and t.is_floating_point():  # fp8: isfinite has no kernel for it
            t = t.float()
        return bool(torch.isfinite(t).all())


def check_finite_chunk(latents: Tensor, frames: Optional[Tensor], *, context: Optional[Tensor], model=None,
                       index: int = 0) -> None:
    """Stop a stream whose chunk holds NaN or Inf, naming the likely cause. On a GPU the check costs one sync
    a chunk, which the copy of its frames to the host makes anyway."""
    bad_latents = not all_finite(latents)
    bad_frames = frames is not None and not all_finite(frames)
    if not (bad_latents or bad_frames):
        return
    if context is not None and not all_finite(context):
        cause = "the conditioning holds NaN/Inf: check the text encoder's weights or the conditioning input"
    elif model is not None and any(not all_finite(p) for p in model.parameters()):
        cause = "the model's weights hold NaN/Inf: the checkpoint is damaged; download or export it again"
    elif not bad_latents:
        cause = "the VAE decoded NaN/Inf: its weights are damaged, or the dtype overflows (try float32)"
    else:
        cause = ("the settings diverge (steps, shift or strength), or the input image/video holds NaN/Inf; "
                 "try the model's default steps")
    raise NonFiniteError(f"chunk {index} came out with NaN/Inf values, so the stream stopped: {cause}")
