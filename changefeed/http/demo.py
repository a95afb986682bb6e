"""GET /: the two-pane demo (an editor and a viewer of one slug); GET /dashboard: the pages under a prefix.

The template and the static files live in this package (http/templates,
http/static). The scripts find the API beside their own URL, so under a
prefix (/feed/static/changefeed.js) they call /feed/changes.
"""

from pathlib import Path

from flask import Blueprint, render_template, request, url_for

from changefeed.core.schemas import TRANSPORTS

from .services import services

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
TEMPLATE = "changefeed.html"  # names no host app's own templates are likely to have
DASHBOARD_TEMPLATE = "changefeed-dashboard.html"

# The page itself runs only its own scripts; saved html lives in a sandboxed
# srcdoc iframe, which inherits this policy and may show images and styles.
PAGE_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'self'; img-src * data: blob:; style-src 'self' 'unsafe-inline'; "
     "font-src * data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
]

blueprint = Blueprint("demo", __name__, template_folder=str(TEMPLATES))
# The scripts and styles at <prefix>/static/: registered by the extension unless the app serves this
# very folder there already (the standalone app, whose own `static` endpoint it is).
assets = Blueprint("assets", __name__, static_folder=str(STATIC), static_url_path="/static")


@blueprint.get("/")
def page() -> tuple[str, list[tuple[str, str]]]:
    """Serve the demo: an editor and a viewer of one slug."""
    query = services().schemas.page.load(request.args)
    html = render_template(TEMPLATE, slug=query["slug"], transport=query["transport"], transports=TRANSPORTS,
                           static=static_url)
    return html, PAGE_HEADERS


@blueprint.get("/dashboard")
def dashboard() -> tuple[str, list[tuple[str, str]]]:
    """Serve the dashboard: a live list of the pages under a prefix, on one connection."""
    query = services().schemas.dashboard.load(request.args)
    html = render_template(DASHBOARD_TEMPLATE, prefix=query["prefix"], transport=query["transport"],
                           transports=TRANSPORTS, static=static_url)
    return html, PAGE_HEADERS


def static_url(filename: str) -> str:
    """The URL of one of the demo's static files, wherever they are served."""
    return url_for(services().static_endpoint, filename=filename)
