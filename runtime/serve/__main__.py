"""The old spelling of the HTTP server's command: one line naming the new one."""

import sys

print("error: `python -m runtime.serve` is now `python -m serving` (same flags)", file=sys.stderr)
sys.exit(2)
