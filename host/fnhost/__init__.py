"""fnhost: a serverless-style function host over NATS.

The runtime (manifest, triggers, middleware, plugins, CLI). Function authors
import :mod:`fnhost_sdk` instead.
"""

__version__ = "0.1.0"
