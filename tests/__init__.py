"""vmplug's tests; shared helpers in :mod:`tests.support`, shared fixtures in tests/conftest.py."""
