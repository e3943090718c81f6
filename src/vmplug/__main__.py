"""``python -m vmplug``: the same as the ``vmplug`` command."""

from vmplug.cli import main

if __name__ == "__main__":
    main()
