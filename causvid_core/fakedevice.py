"""GPU code paths without a GPU: fake CUDA tensors, and a tracker of the device memory they would take.

`FakeDevice` runs code under torch's FakeTensorMode: tensors carry shape, dtype and device but no data.
Like CUDA it refuses an op that mixes a (fake) CUDA tensor with a CPU tensor that is not a 0-dim
scalar, and any read of a value on the host (`.item()`, `float(t)`, `.tolist()`, `torch.equal`): the
stray CPU tensors and host syncs a GPU run would crash on or wait for. Kernels CUDA has and the CPU
lacks (and the reverse) are checked by their meta implementations, e.g. CUDA's layer norm refusing a
float32 input with bf16 weights.

`MemoryTracker` counts the bytes of every live tensor per device, current and peak, from the moment
it is entered (plus what `track()` is given): each storage from its creation until Python frees it, at its
size (following resizes: FSDP frees and regathers weights that way), rounded up to the CUDA caching
allocator's 512-byte blocks. It does not see the CUDA context (~0.3-0.5
GB per process) or allocator fragmentation, which `causvid bench memory` reports separately.

Nothing here is used on a real run; tests and `causvid bench memory` use it.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block


class FakeDevice:
    """`with FakeDevice() as fd:` everything made inside is fake; `fd.device` is the fake device."""

    def __init__(self, device: str = "cuda"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        # real tensors met inside (module weights made before, constants) become fake CPU tensors, so a
        # CPU tensor mixed into a device op fails as it would on a GPU
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)

    def __enter__(self) -> "FakeDevice":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    def module(self, module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """Put a module's parameters and buffers on the fake device (floating ones in `dtype`), in place.
        Works for real modules (their values are dropped) and meta-built ones of any size."""
        with self.mode:
            sd = {k: torch.empty(v.shape, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype,
                                 device=self.device)
                  for k, v in module.state_dict(keep_vars=True).items()}
        module.load_state_dict(sd, assign=True, strict=True)
        return module.eval()

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        with self.mode:
            return torch.zeros(shape, dtype=dtype, device=device or self.device)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """A module of any size without memory (its weights on the meta device), for FakeDevice.module."""
    with torch.device("meta"):
        return factory()


class MemoryTracker(TorchDispatchMode):
    """Current and peak bytes of live tensors per device (see the module docstring)."""

    def __init__(self, block: int = CUDA_BLOCK_BYTES):
        super().__init__()
        self.block = block
        self.current: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._seen: dict[int, weakref.ref] = {}
        self._size: dict[int, tuple[str, int]] = {}  # storage key -> (device, counted bytes)
        self._resize = None  # UntypedStorage.resize_ while tracking

    def __enter__(self):
        # FSDP frees a gathered weight's memory by resizing its storage to 0 (and gathers into it again by
        # resizing it back), which no tensor op shows: follow storage resizes while tracking
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker._resized(storage)
            return out

        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    # -- registering storages ---------------------------------------------------------------------
    def track(self, *objs: nn.Module | Tensor | Iterable) -> None:
        """Count tensors that exist already (model weights, a cache made before entering)."""
        for obj in objs:
            if isinstance(obj, nn.Module):
                for t in obj.state_dict(keep_vars=True).values():
                    self._register(t)
            elif isinstance(obj, Tensor):
                self._register(obj)
            elif obj is not None:
                self.track(*obj)

    def _register(self, t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse or other storage-less tensors
            return
        key = id(st)
        ref = self._seen.get(key)
        if ref is not None and ref() is st:
            return
        size = self._rounded(st.nbytes())
        dev = str(t.device)
        self.current[dev] += size
        self.peak[dev] = max(self.peak[dev], self.current[dev])
        self._size[key] = (dev, size)
        self._seen[key] = weakref.ref(st, lambda _r, key=key: self._free(key))

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block) * self.block if nbytes else 0

    def _resized(self, st) -> None:
        key = id(st)
        ref = self._seen.get(key)
        if ref is None or ref() is not st:
            return
        dev, old = self._size[key]
        new = self._rounded(st.nbytes())
        self.current[dev] += new - old
        self.peak[dev] = max(self.peak[dev], self.current[dev])
        self._size[key] = (dev, new)

    def _free(self, key: int) -> None:
        dev, size = self._size.pop(key, (None, 0))
        if dev is not None:
            self.current[dev] -= size
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(Tensor, self._register, out)
        return out

    # -- reading ----------------------------------------------------------------------------------
    def reset_peak(self, device: str) -> None:
        """Start a new peak window at the current level (e.g. to measure one decode)."""
        self.peak[device] = self.current[device]

    def peak_bytes(self, device: str) -> int:
        return self.peak[device]

    def current_bytes(self, device: str) -> int:
        return self.current[device]
