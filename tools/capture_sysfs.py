#!/usr/bin/env python3
"""Capture this machine's USB sysfs tree into a fixture directory (a sysfs root).

A thin wrapper around :mod:`vmplug_lab.capture`, kept here so the capture can
be run by path on any Linux with USB, the lab guest included::

    .venv/bin/python tools/capture_sysfs.py OUT [--sysfs /sys] [--meta META.json]

To re-make the committed fixtures, use ``python -m vmplug_lab.capture_all``.
"""

from __future__ import annotations

import sys

from vmplug_lab.capture import main

if __name__ == "__main__":
    sys.exit(main())
