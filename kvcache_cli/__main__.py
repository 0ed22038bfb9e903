"""``python -m kvcache_cli``."""

from kvcache_cli.cli.app import main

main()
