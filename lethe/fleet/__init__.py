"""Running Lethe on this machine: real processes, started and stopped together."""
