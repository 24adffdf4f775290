import sys

from sealdiff.cli import main

sys.exit(main())
