"""`python -m alpaca_convert`: the convert-weights command."""

import sys

from .cli import main

sys.exit(main())
