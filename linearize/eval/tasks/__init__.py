"""Offline lm-eval task definitions (YAML) and their data loaders."""
