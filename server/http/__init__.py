"""The HTTP side: the FastAPI app (inspection, snapshot download, changes), the JSON views it
serves, Prometheus metrics and the dashboard's static files."""
