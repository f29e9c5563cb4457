"""ComfyUI adapters (V1 node API): thin classes over causvid_core. Imported only by the root
__init__.py through relative imports, never as a top-level `nodes` package."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
