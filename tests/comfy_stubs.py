"""ComfyUI's few host modules, stubbed, so the node classes run without a ComfyUI: folder_paths,
comfy.utils (ProgressBar), comfy.model_management (devices, interruption, load_models_gpu),
comfy.model_patcher (ModelPatcher) and server (PromptServer's route table). The device is the CPU or a fake one (causvid_core.fakedevice): the
stub's load_models_gpu then moves a patcher's module there as ComfyUI would, replacing its Parameters."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("folder_paths", "comfy", "comfy.utils", "comfy.model_management", "comfy.model_patcher", "server")


class Host:
    """What the stubs record: progress updates, interruption checks, loads."""

    def __init__(self, models: Path, output: Path, device: torch.device,
                 move: Optional[Callable[[torch.nn.Module], None]] = None):
        self.models, self.output, self.device, self.move = models, output, device, move
        for folder in (models, output):
            folder.mkdir(parents=True, exist_ok=True)
        self.input = output.parent / "input"
        self.updates: list = []
        self.loads: list = []  # (module class names, memory_required, force_full_load)
        self.interrupt_after: int | None = None
        self.checks = 0


def stub_modules(host: Host) -> dict[str, types.ModuleType]:
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda f: sorted(p.name for p in host.models.glob("*.safetensors")) \
        if f == "diffusion_models" else []
    folder_paths.get_full_path = lambda f, n: str(host.models / n) \
        if f == "diffusion_models" and (host.models / n).exists() else None
    folder_paths.get_output_directory = lambda: str(host.output)
    folder_paths.get_input_directory = lambda: str(host.input)
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")
    mp = types.ModuleType("comfy.model_patcher")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            host.updates.append((value, total, preview))

    def interrupted():
        host.checks += 1
        if host.interrupt_after is not None and host.checks > host.interrupt_after:
            raise InterruptedError("Processing interrupted")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        host.loads.append(([type(p.model).__name__ for p in models], memory_required, force_full_load))
        for p in models:
            tensors = [t for t in p.model.state_dict(keep_vars=True).values() if t is not None]
            if host.move is not None and any(t.device != torch.device(p.load_device) for t in tensors):
                host.move(p.model)

    utils.ProgressBar = ProgressBar
    mm.throw_exception_if_processing_interrupted = interrupted
    mm.get_torch_device = lambda: host.device
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.should_use_bf16 = lambda device=None, **kw: True
    mm.load_models_gpu = load_models_gpu
    mp.ModelPatcher = ModelPatcher
    comfy.utils, comfy.model_management, comfy.model_patcher = utils, mm, mp
    server = types.ModuleType("server")

    class PromptServer:  # the route table the pack adds its live routes to; no event loop, no pages
        instance = None

        def __init__(self):
            from aiohttp import web

            self.routes, self.loop = web.RouteTableDef(), None

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    return {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
            "comfy.model_patcher": mp, "server": server}


@contextlib.contextmanager
def stubbed_pack(host: Host, name: str = "causvid_pack"):
    """The node pack imported (as ComfyUI does: the root __init__.py) with the host modules stubbed."""
    saved = {k: sys.modules.get(k) for k in (*MODULES, name)}
    sys.modules.update(stub_modules(host))
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith(name + ".")]:
            del sys.modules[k]
