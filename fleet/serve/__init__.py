"""Serving: every head of a version in memory (head_table), FleetModel (serving), the MLflow pyfunc and the HTTP app. Imports the packages below it."""
