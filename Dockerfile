# The kitebus image: `kitebus publish` by default; `kitebus simulate …`, `kitebus status`
# and the other commands by argument. No secret is baked in: KITE_API_KEY and the access
# token (or KITE_ACCESS_TOKEN_FILE on a mounted volume) come at run time.

# Build stage: a compiler, so the C hot paths (kitewire/_speedups.c, consumers/_speedups.c) are built.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY config config
COPY kitewire kitewire
COPY rediswire rediswire
COPY publisher publisher
COPY simulator simulator
COPY consumers consumers
COPY kitebus kitebus
RUN pip install --no-cache-dir --prefix=/install . \
    && python -c "import sys; sys.path.insert(0, '/install/lib/python3.11/site-packages'); import kitewire._speedups, consumers._speedups"

# Runtime: no compiler, a user of its own.
FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 kitebus
USER kitebus
WORKDIR /home/kitebus
ENV KITEBUS_LOG_LEVEL=INFO
# Healthy while the namespace's leader beats (a standby is healthy while someone leads).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["kitebus", "status", "--json", "--sample", "0"]
ENTRYPOINT ["kitebus"]
CMD ["publish"]
