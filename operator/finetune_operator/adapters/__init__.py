"""The only code that talks to the API server (kubernetes client, kopf events) or serves Prometheus."""
