"""changefeed: a page is saved, and every open tab that shows it learns of the new version at once.

The package is cut in layers, each importing only the ones below it:
core <- ops <- stores <- security <- transports <- http (see README,
*Architecture*). This module imports nothing heavy: the gunicorn master
reads it before gevent patches anything.
"""

__version__ = "1.0.0"
