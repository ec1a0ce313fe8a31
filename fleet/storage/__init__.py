"""Where versions live: fleet versions and run work dirs on fsspec (store), and MLflow: the promotion gate (pure,
promotion_gate), tracking URIs, locks and the client (tracking), the compress's run (runs), model versions and the
champion alias (registry). Imports core, compression, formats; registry imports fleet.serve.pyfunc late (logging a
version)."""
