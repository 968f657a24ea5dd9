"""Pieces of the router-overhead benchmark: load generator, process group, tool set-up, report.

Benchmark code only: nothing here is imported by the InferMesh distributions.
"""
