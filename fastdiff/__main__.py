"""``python -m fastdiff ...`` (and ``torchrun ... -m fastdiff sample ...``): the ``fastdiff`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
