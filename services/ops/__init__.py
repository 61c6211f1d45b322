"""Operating the pipeline: dead letters (list, show, replay, purge, audit), lag and topic counts.

Plain functions and small classes used by `orderpipe dlt`, `orderpipe lag` and
`orderpipe topics describe` (services/cli/dlt_cmd.py, ops_cmd.py); tests drive them directly.
Nothing here connects to anything at import time.
"""

from services.ops.errors import OpsError

__all__ = ["OpsError"]
