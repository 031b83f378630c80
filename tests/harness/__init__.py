"""Test and benchmark helpers that run real third-party parts (stdlib only)."""
