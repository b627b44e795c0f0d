"""The only code that talks to the API server (adapters/rest.py over urllib3, kopf events) or serves Prometheus."""
