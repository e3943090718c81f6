"""Maintenance tools (captures, dependency floors); run from the repository root."""
