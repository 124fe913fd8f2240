"""Lethe: federated continual learning for edge devices that can also forget.

This package holds only the command line that wires the parts together; the
parts themselves live in the top-level packages `client`, `coordinator`,
`shared` and `edge_models`.
"""

__version__ = "0.1.0"
