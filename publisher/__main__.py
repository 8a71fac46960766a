"""``python -m publisher`` is ``kitebus publish``."""

import sys

from publisher.app import main

sys.exit(main())
