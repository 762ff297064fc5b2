"""Test doubles shipped inside the package, so the demo and benchmarks can use them too."""
