"""Serving: every head of a version in memory (head_table), FleetModel (serving), the MLflow pyfunc and the HTTP
app (http; its bodies http_schemas, its served model http_holder, its metrics http_metrics, its middleware
http_middleware). Imports the packages below it."""
