"""The decision-cost micro-benchmark's modules: the synthetic candidates and the report."""
