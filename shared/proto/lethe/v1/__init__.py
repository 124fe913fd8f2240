"""Version 1 of Lethe's public gRPC API (proto package `lethe.v1`): the deletion service."""
