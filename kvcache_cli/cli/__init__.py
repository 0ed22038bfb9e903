"""The command line: Typer commands that parse, call one service, render."""

from kvcache_cli.cli.app import app, main

__all__ = ["app", "main"]
