"""InferMesh vllm."""
