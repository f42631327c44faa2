"""Third-party-style fnhost plugins used by tests/test_plugins.py (listed under ``plugins:``).

Each module is a plugin; they share one log in :mod:`.record`, which tests reset.
"""
