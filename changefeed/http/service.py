"""The whole HTTP service as blueprints, for the extension (changefeed/extension.py) to register under a prefix.

`blueprint` nests those every app gets: the API (api.py), /ws, the health
probes, the OpenAPI document and the demo page. Every error in them is
answered in the one JSON shape (errors.py), on any app. Two more are
registered only when wanted: /metrics (health.metrics_blueprint) and the
demo's static files (demo.assets).
"""

from flask import Blueprint

from . import api, demo, errors, health, openapi, ws

blueprint = Blueprint("changefeed", __name__)
for child in (api.blueprint, ws.blueprint, health.blueprint, openapi.blueprint, demo.blueprint):
    blueprint.register_blueprint(child)
errors.register(blueprint)
errors.register(health.metrics_blueprint)
