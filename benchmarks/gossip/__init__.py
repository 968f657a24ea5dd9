"""Pieces of the gossip-vs-Serf benchmark: lossy proxy, member processes, runners, report.

Benchmark code only: nothing here is imported by the InferMesh distributions.
"""
