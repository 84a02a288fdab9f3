"""``python -m sfrtr``: the same as the ``sfrtr`` command."""

from sfrtr.cli import main

raise SystemExit(main())
