"""ComfyUI entry point of the causvid-stream node pack (the repository root is the pack)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, install_example_inputs, register_routes

register_routes()
install_example_inputs()

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
