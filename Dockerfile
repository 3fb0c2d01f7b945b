# The appliance in a container: the package, llama-cpp-python built once for
# every x86-64 CPU (the runtime picks its kernels at start-up, so the image runs
# on other machines than the build host), and the default model, all baked into
# the image. The data directory (database, keys, audit log) lives on the /data volume.
#
#   docker build -t appliance .
#   docker run --restart=on-failure -p 8080:8080 -v appliance-data:/data \
#       -e APPLIANCE_SERVER_ALLOWED_HOSTS=ai.example.lan appliance
#
# The container listens on every address, so it needs the host names clients use
# (APPLIANCE_SERVER_ALLOWED_HOSTS, comma-separated; only localhost is allowed by
# default), and it serves HTTPS with a self-signed certificate made at the first
# start: its SHA-256 fingerprint is in the container log, for clients to pin.
#
# --restart=on-failure brings the service back after a crash (a native fault in
# llama.cpp, say); nothing acknowledged is lost, as every response waits for its
# audit record's commit. The HEALTHCHECK marks a hung server unhealthy.
# The first start prints the first admin key once in the container log.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    APPLIANCE_DATA_DIR=/data

# Compilers and cmake to build llama-cpp-python from source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . /app

# Install everything except `appliance init`: initialising at build time would
# bake a database and an admin key into an image layer. It runs at start-up
# instead (idempotent, so restarts with the same volume change nothing).
RUN rm -rf .venv \
    && ./install.sh --no-init

VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD [".venv/bin/python", "-c", "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:8080/healthz', timeout=4, context=ssl._create_unverified_context())"]

# Binding 0.0.0.0 is the explicit choice here: inside a container it is the only
# way to be reachable through the published port.
ENV APPLIANCE_SERVER_ALLOWED_HOSTS=localhost
ENTRYPOINT ["/bin/sh", "-c", ".venv/bin/appliance init --tls --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf --model-name smollm2-135m-instruct && exec \"$@\"", "appliance-entrypoint"]
CMD [".venv/bin/appliance", "serve", "--host", "0.0.0.0"]
