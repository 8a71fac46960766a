"""``python -m publisher`` is ``kitebus publish``."""

import sys

from kitebus.cli import main

sys.exit(main(["publish", *sys.argv[1:]]))
