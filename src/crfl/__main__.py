"""``python -m crfl``: the ``crfl`` command (:func:`crfl.cli.main`)."""

import sys

from crfl.cli import main

if __name__ == "__main__":
    sys.exit(main())
