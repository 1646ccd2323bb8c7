"""``python -m bench`` → ``bench.cli.main`` (see bench/README.md)."""

import sys

from bench.cli import main

sys.exit(main())
