"""Helpers shared by the tests: tiny models and Hugging Face checkpoints, local clusters, fakes, corrupt data."""
