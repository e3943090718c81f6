"""vmplug.guest."""
