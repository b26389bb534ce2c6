"""``python -m dynnet``: the ``dynnet`` command (:func:`dynnet.cli.main`)."""

import sys

from dynnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
