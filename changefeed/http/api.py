"""The API blueprint: the page API, the event stream, presence and the session, behind one guard.

Its before_request is access.guard: the cross-site check of every write and
the token each view asks for, in one place. Each child blueprint is a module
of its own, importable and testable alone.
"""

from flask import Blueprint

from . import access, events, feed, pages, presence, session

blueprint = Blueprint("api", __name__)
blueprint.before_request(access.guard)
for child in (pages.blueprint, feed.blueprint, events.blueprint, presence.blueprint, session.blueprint):
    blueprint.register_blueprint(child)
