"""The API's own documentation: GET /openapi.json and Swagger UI at GET /docs.

Swagger UI's scripts and styles come from the flask-swagger-ui package's
files and are served by this app, so the page works with no network.
"""
from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, jsonify, render_template_string, send_from_directory, url_for

from openapi_document import openapi_document

docs = Blueprint("docs", __name__)

SWAGGER_UI_FILES = str(files("flask_swagger_ui").joinpath("dist"))

# validatorUrl null: Swagger UI would otherwise send the document to an online validator.
SWAGGER_UI_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Vector embedder API</title>
  <link rel="stylesheet" href="{{ url_for('docs.swagger_ui_asset', asset='swagger-ui.css') }}">
  <link rel="icon" type="image/png" href="{{ url_for('docs.swagger_ui_asset', asset='favicon-32x32.png') }}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{{ url_for('docs.swagger_ui_asset', asset='swagger-ui-bundle.js') }}"></script>
  <script>
    window.onload = function () {
      window.ui = SwaggerUIBundle({
        url: {{ document_url | tojson }},
        dom_id: "#swagger-ui",
        presets: [SwaggerUIBundle.presets.apis],
        layout: "BaseLayout",
        deepLinking: true,
        validatorUrl: null
      });
    };
  </script>
</body>
</html>
"""


@docs.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_document())


@docs.get("/docs")
def swagger_ui():
    return render_template_string(SWAGGER_UI_PAGE, document_url=url_for("docs.openapi_json"))


@docs.get("/docs/<path:asset>")
def swagger_ui_asset(asset: str):
    return send_from_directory(SWAGGER_UI_FILES, asset)
