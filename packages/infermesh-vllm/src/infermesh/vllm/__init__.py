"""InferMesh runtime adapter and control for vLLM (plugin kind "vllm")."""
