"""API keys and roles: what the API and the command line share."""
