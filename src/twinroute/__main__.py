import sys

from twinroute.cli import main

sys.exit(main())
