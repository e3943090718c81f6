"""Helpers more than one test directory (or a bench) uses, imported as
``from tests.support.qemu_proc import QemuProcess``.

The repository root is on ``sys.path`` through pytest's ``pythonpath`` option
(pyproject.toml); benches run from the root as ``python -m bench.bench_x``.

* :mod:`~tests.support.qemu_proc`: real qemu-system-x86_64 processes;
* :mod:`~tests.support.fakekernel`: a captured sysfs tree changed as the kernel
  would, with its uevents;
* :mod:`~tests.support.apirig`: a daemon with its API and real QEMU VMs;
* :mod:`~tests.support.vmrig`: a Docker Engine API document store, a private libvirtd;
* :mod:`~tests.support.vmhelp`: waiting for a VM backend's events;
* :mod:`~tests.support.devices`: the captured USB devices the tests match and generate for;
* :mod:`~tests.support.parsers`, :mod:`~tests.support.udev_parse`: independent
  readers of what the generators write.
"""
