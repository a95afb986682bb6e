"""/openapi.json: a valid OpenAPI 3.1 document of every route, from the schemas the endpoints validate with."""

from openapi_spec_validator import validate

from changefeed.core.schemas import ChangesQuerySchema, EventsQuerySchema, FeedQuerySchema


def test_the_document_is_valid_openapi_3_1_and_served(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_route_is_documented_with_every_method(app, client):
    paths = client.get("/openapi.json").get_json()["paths"]
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            routes.setdefault(rule.rule, set()).update(m.lower() for m in rule.methods)
    assert set(routes) == set(paths)
    for path, methods in routes.items():
        undocumented = {"head", "options"} if path == "/ws" else {"head"}  # /ws: a WebSocket handshake only
        assert methods - undocumented == set(paths[path]), path


def test_query_parameters_are_exactly_the_fields_the_schemas_accept(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    for path, schema in [("/changes", ChangesQuerySchema()), ("/events", EventsQuerySchema()),
                         ("/feed", FeedQuerySchema())]:
        documented = {p["name"] for p in paths[path]["get"]["parameters"] if p["in"] == "query"}
        assert documented == {field.data_key or name for name, field in schema.fields.items()}, path


def test_the_save_body_is_the_save_schema(client):
    document = client.get("/openapi.json").get_json()
    body = document["components"]["schemas"]["SaveRequest"]
    assert set(body["properties"]) == {"slug", "html", "data", "base_version"}
    assert set(body["required"]) == {"slug", "html"}
