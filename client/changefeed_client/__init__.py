"""changefeed_client: save pages to a changefeed service, and watch them, from Python.

    from changefeed_client import Client

    with Client("http://127.0.0.1:5000") as feed:
        feed.save("home", "<h1>Hello</h1>")
        for page in feed.watch("home"):
            print(page.version, page.html)

`AsyncClient` has the same calls for asyncio. See docs/client.md.
"""

from .aio import AsyncClient
from .errors import AuthError, ChangefeedError, Conflict, InvalidRequest, TooManyRequests, Unavailable
from .models import Beat, Change, Page, Reset, Saved
from .sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AuthError", "Beat", "Change", "ChangefeedError", "Client", "Conflict", "InvalidRequest",
    "Page", "Reset", "Saved", "TooManyRequests", "Unavailable", "__version__",
]
