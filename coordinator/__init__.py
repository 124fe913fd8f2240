"""The coordinator: Flower ServerApp, scheduling, aggregation, state and the deletion API."""
