"""Forgetting a person's data on request: the edits a device applies, and how well it forgot."""
