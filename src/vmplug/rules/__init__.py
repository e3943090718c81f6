"""vmplug.rules."""
