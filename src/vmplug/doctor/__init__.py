"""vmplug.doctor."""
