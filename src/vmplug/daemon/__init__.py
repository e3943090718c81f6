"""The daemon's services: the reconciler, its journal and its read model.

:mod:`~vmplug.daemon.reconciler` owns the state (the inventory, what each VM
holds, the overrides, the retries) and changes it; :mod:`~vmplug.daemon.journal`
writes what happened to the history and to the listeners;
:mod:`~vmplug.daemon.readmodel` is what the API, the metrics and ``vmplug
status`` read.
"""
