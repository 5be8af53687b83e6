"""Micro-benchmarks of the operators."""
