"""`python -m tritlm`: the same as the `tritlm` command."""

from .cli import main

raise SystemExit(main())
