"""Bundled example data and models used by tests and examples."""
