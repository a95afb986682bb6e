"""The HTTP layer: blueprints, the one error shape, request bodies and the OpenAPI document."""
