import sys

from lorp_fx.cli import main

sys.exit(main())
