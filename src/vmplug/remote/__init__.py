"""Remote devices: USB devices on one host, VMs on another (usbredir over mutual TLS).

* :mod:`vmplug.remote.certs`: the installation's CA and one certificate per host;
* :mod:`vmplug.remote.export`: the device host's endpoints (TLS, usbredirect, relay).

The VM side is QEMU itself (:class:`vmplug.vms.base.UsbRedirSpec`,
:meth:`vmplug.vms.qmp.QmpVm.attach`).
"""
