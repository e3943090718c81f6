"""vmplug.vms."""
