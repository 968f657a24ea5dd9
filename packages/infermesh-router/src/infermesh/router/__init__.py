"""InferMesh router."""
