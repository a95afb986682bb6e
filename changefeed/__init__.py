"""changefeed: a page is saved, and every open tab that shows it learns of the new version at once.

The package is cut in layers, each importing only the ones below it:
core <- ops <- stores <- security <- transports <- http <- extension (the Flask
extension, on top; see docs/architecture.md).

    from changefeed import Changefeed
    feed = Changefeed(app, url_prefix="/feed")

This module imports nothing heavy: the gunicorn master reads it (through
changefeed.ops.worker) before gevent patches anything, and Flask imported
there makes each worker's exit print "Exception ignored" from logging's
lock. So `Changefeed` is imported on first use, by the module __getattr__
below (PEP 562), not here.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from changefeed.extension import Changefeed

__version__ = "1.0.0"
__all__ = ["Changefeed", "__version__"]


def __getattr__(name: str) -> Any:
    """`changefeed.Changefeed`, imported when first asked for (see above)."""
    if name == "Changefeed":
        from changefeed.extension import Changefeed

        return Changefeed
    raise AttributeError(f"module 'changefeed' has no attribute {name!r}")
