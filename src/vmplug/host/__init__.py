"""vmplug.host."""
