# One image for every orderpipe process: `docker run IMAGE run inventory`, `... topics create`;
# the order-status worker overrides the entrypoint with `python -m streams.order_status`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
COPY streams ./streams

# Editable on purpose: the codec reads schemas/ next to the `services` package
# (services/runtime/codec.py: SCHEMAS_DIR), and a plain `pip install .` does not ship
# schemas/ in the wheel, so every encode/decode would fail. The code stays in /app.
# The rocksdb extra gives the order-status worker its durable table store.
RUN pip install -e ".[rocksdb]"

RUN groupadd --system --gid 10001 orderpipe \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin orderpipe \
    && mkdir -p /data \
    && chown 10001:10001 /data
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# SQLite files (if no database URLs are set), invoice PDFs, the order-status store.
ENV ORDERPIPE_DATA_DIR=/data
# 8000 orders API, 6066 order-status view, 9100 /healthz /readyz /metrics of the other processes
# (bound to all interfaces in a container; the default 127.0.0.1 suits one machine).
ENV ORDERPIPE_HEALTH_HOST=0.0.0.0
EXPOSE 8000 6066 9100

ENTRYPOINT ["orderpipe"]
CMD ["--help"]
