# syntax=docker/dockerfile:1
# One image for every behalf role: the command picks the role
# (behalf api | worker | scheduler | migrate | sandbox | ...).

# --- build: install behalf and its dependencies into a virtualenv -------------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/behalf
WORKDIR /src
# .dockerignore keeps tests, virtualenvs, .git, .env and terraform out of the context.
COPY . .
RUN /opt/behalf/bin/pip install .

# --- runtime: the virtualenv only, run as an unprivileged user ----------------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 10001 behalf \
    && useradd --system --uid 10001 --gid behalf --home-dir /home/behalf --create-home \
       --shell /usr/sbin/nologin behalf

COPY --from=build /opt/behalf /opt/behalf

ENV PATH=/opt/behalf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/behalf

WORKDIR /home/behalf
USER 10001:10001

EXPOSE 8000
CMD ["behalf", "api", "--host", "0.0.0.0", "--port", "8000"]
