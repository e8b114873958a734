"""Benchmarks behind `facescale bench`, one module each."""
