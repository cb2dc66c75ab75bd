# syntax=docker/dockerfile:1.7
# One image for every twinroute process: `twinroute operator`, `twinroute scheduler`,
# `twinroute router` and `twinroute engine-sim` (the operator and chart choose the command).
#   docker build -t ghcr.io/twinroute/twinroute:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY scheduler ./scheduler
COPY operator ./operator
COPY proto ./proto
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-compile /wheels/*.whl \
    && groupadd --gid 10001 twinroute \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin twinroute
# Numeric user so Kubernetes can verify runAsNonRoot without resolving names.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081 9090 50051
ENTRYPOINT ["twinroute"]
CMD ["--help"]
