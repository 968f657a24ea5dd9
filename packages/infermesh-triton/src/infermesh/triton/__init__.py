"""InferMesh triton."""
