"""`python -m lmcompress.cli`."""

import sys

from lmcompress.cli import main

sys.exit(main())
