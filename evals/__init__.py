"""Offline evaluation: benchmarks on local data, text metrics, preference statistics, reports and the gate.

Reads registry entries, writes results (evals/results.py is the one format every part of it shares)."""
