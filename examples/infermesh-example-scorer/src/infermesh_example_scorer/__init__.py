"""An example third-party InferMesh plugin (see plugin.py)."""
