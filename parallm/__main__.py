import sys

from parallm.cli import main

sys.exit(main())
