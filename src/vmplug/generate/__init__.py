"""vmplug.generate."""
