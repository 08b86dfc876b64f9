# The bot as a container: non-root, state in one volume, a health check on /live.
#   docker build -t gemini-bot .
#   docker run -d --name gemini-bot --env-file .env -v gemini-bot-data:/app/data \
#       --stop-timeout 30 gemini-bot
# See deploy/README.md for the details (ports, the HTTP API's address, stopping, the sandbox).

# Build stage: install the project and its runtime dependencies (not the dev extras) into
# /install, so the final image carries neither the source tree nor build leftovers.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.md is the package's readme in pyproject.toml: the build needs it.
COPY pyproject.toml README.md ./
COPY resilience/ resilience/
COPY services/ services/
COPY bot/ bot/
COPY sandbox/ sandbox/
COPY rehearsal/ rehearsal/
COPY plugins/ plugins/
RUN pip install --prefix=/install .

FROM python:3.11-slim
# Same base image, so /install lands where the interpreter looks (/usr/local).
COPY --from=build /install /usr/local

# A fixed numeric uid/gid: bind-mounted data directories can be chowned to it, and
# orchestrators that enforce "run as non-root" can verify a number, not a name.
RUN groupadd --system --gid 10001 bot \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin bot \
    && mkdir -p /app/data \
    && chown -R 10001:10001 /app/data

# HTTP_HOST stays on loopback: the health check runs inside the container's network
# namespace, so 127.0.0.1 reaches the API without publishing it. Set HTTP_HOST=0.0.0.0 only
# together with ADMIN_API_TOKEN and a private network (deploy/README.md).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/app/data \
    HTTP_HOST=127.0.0.1 \
    HTTP_PORT=3000 \
    LOG_FORMAT=json

WORKDIR /app
# Created above with the bot's ownership, so a new named volume starts out writable by it.
VOLUME /app/data
EXPOSE 3000
USER 10001:10001

# No curl in the slim image: the check is a few lines of Python. Exit 0 healthy, 1 not
# (an HTTP error status, a refused connection and a timeout all raise). An empty
# HTTP_PORT means the default, as in the bot's own configuration.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('HTTP_PORT') or '3000'; urllib.request.urlopen(f'http://127.0.0.1:{port}/live', timeout=4); sys.exit(0)"]

# The bot handles SIGTERM: it stops taking messages, lets in-flight ones finish within
# SHUTDOWN_GRACE_SECONDS (default 10 s) and closes its stores. Docker's default stop timeout
# is also 10 s, so give it more (docker stop -t 30, --stop-timeout 30, compose
# stop_grace_period: 30s).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "bot", "run"]
