"""An example third-party InferMesh runtime adapter for llama.cpp's llama-server (plugin.py)."""
