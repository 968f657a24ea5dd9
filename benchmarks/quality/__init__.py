"""The live routing-quality benchmark's modules: the fleet it starts and the report it prints."""
