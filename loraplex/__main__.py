"""`python -m loraplex ...` is the `loraplex` command."""

import sys

from .cli import main

sys.exit(main())
