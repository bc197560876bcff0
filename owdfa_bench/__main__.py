"""`python -m owdfa_bench <command>`: the `owdfa-bench` command without its script on PATH."""

import sys

from owdfa_bench.cli import main

sys.exit(main())
