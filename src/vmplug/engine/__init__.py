"""vmplug.engine."""
