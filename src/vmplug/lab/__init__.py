"""vmplug.lab."""
