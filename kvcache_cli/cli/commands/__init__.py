"""One module per ``kvcache`` command; ``cli/app.py`` registers them (they never import it)."""
