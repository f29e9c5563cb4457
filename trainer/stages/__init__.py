"""The training stages, in pipeline order. Each is `run(cfg, root, accelerator=None)` and leaves its
outputs in `root/<stage>/` with a DONE.json; a stage whose DONE.json exists is skipped."""
