"""Benchmarks: ``python -m stress NAME --json`` runs one and prints one JSON line of results."""
