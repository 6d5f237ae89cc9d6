"""Microbenchmarks: one harness (harness.py) and one suite per op family; `dsv3 bench NAME` runs a suite."""
