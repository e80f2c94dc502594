# Dockerfile: the waitroom image (API server, workers and CLI; see docker-compose.yml).
# No ENTRYPOINT: docker-compose.yml gives full commands such as ["waitroom", "serve"].
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, from the hashed pins (scripts/lock makes them), so this layer is reused
# until requirements/runtime.txt changes. `pip check` fails the build when pyproject.toml has a
# dependency the pins lack: run scripts/lock.
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --require-hashes -r requirements/runtime.txt
COPY . .
RUN pip install --no-deps . \
    && pip check \
    && useradd --system --no-create-home --shell /usr/sbin/nologin waitroom \
    && install -d -o waitroom -g waitroom -m 700 /var/lib/waitroom

USER waitroom
# WAITROOM_RUN_DIR: generated keys live outside /app, which the waitroom user cannot write.
ENV WAITROOM_HOST=0.0.0.0 \
    WAITROOM_PORT=8000 \
    WAITROOM_RUN_DIR=/var/lib/waitroom
EXPOSE 8000
CMD ["waitroom", "serve"]
