"""vmplug's wire layer: every byte vmplug sends to QEMU, the guest agent or a
container engine goes through here.

* :mod:`vmplug.wire.qmp`: QMP on :class:`qemu.qmp.QMPClient` (the daemon's
  event-driven session) and :class:`~vmplug.wire.qmp.SyncQmp`, the blocking
  front for short probes (doctor, ``vmplug vms``, the lab);
* :mod:`vmplug.wire.qga`: the QEMU guest agent through the same library;
* :mod:`vmplug.wire.engine`: the Docker/Podman Engine API over aiohttp;
* :mod:`vmplug.wire.proc`: the ``/proc`` scan for QEMU processes and the one
  QEMU command-line parser.

Errors derive from :class:`vmplug.errors.VmplugError` (see
:mod:`vmplug.wire.errors`) and carry structured fields; this layer maps no
exit codes.  It imports nothing of vmplug but :mod:`vmplug.errors`.
"""
