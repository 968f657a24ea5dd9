"""Scoring: filters, then weighted scorers, then a deterministic ranking with reasons."""
