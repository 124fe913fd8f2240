"""Lethe's versioned public APIs (proto package `lethe.*`)."""
