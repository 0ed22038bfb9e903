"""``python -m kvcache_cli``."""

from .cli import main

main()
