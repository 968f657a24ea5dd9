"""InferMesh dev."""
