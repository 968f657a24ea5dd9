"""InferMesh dcgm."""
