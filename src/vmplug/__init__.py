"""vmplug: route host USB devices into QEMU/KVM virtual machines and keep them there."""

__version__ = "0.1.0"
