"""The kvcache test suite (a package, so helpers import as ``tests.helpers``)."""
