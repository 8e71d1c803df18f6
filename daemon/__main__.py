"""`python -m daemon ...` is the `watchtrain` command (used by the LaunchAgent)."""

from daemon.cli import main

raise SystemExit(main())
