"""Validation of the deployment files (docker-compose.yml, .env.example, Dockerfile, terraform/).

Nothing here starts a container or talks to AWS: the files are parsed and checked statically.
"""
