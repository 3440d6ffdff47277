"""`python -m loadtest run|compare|make-trace ...` (see loadtest/README.md)."""

import sys

from loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
