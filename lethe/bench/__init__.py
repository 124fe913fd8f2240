"""Benchmarks behind `lethe bench ...`: each measures one claim and writes its figures as JSON."""
