import sys

from kitebus.cli import main

sys.exit(main())
