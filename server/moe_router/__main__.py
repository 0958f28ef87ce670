"""``python -m moe_router`` is the ``moe-router`` command."""

from moe_router.cli import main

raise SystemExit(main())
