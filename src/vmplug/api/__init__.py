"""vmplug.api."""
