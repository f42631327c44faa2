"""fnhost's plugin system: the hook contract (:mod:`.hookspecs`), discovery (:mod:`.manager`)
and the built-in plugins, which register through the same hooks as third-party ones."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("fnhost")
"""Mark a function in a plugin module as the implementation of an fnhost hook."""

__all__ = ["hookimpl"]
