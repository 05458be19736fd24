# The image of the example deployment (workers/): web, worker and migration all run from it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package's build takes workers/ and alembic/ too (the wheel ships them for `hybridinval
# demo`), so they are copied before the install. The compiler is there only for the C hit path
# (hybridinval._speedups), and the build fails if that did not compile.
COPY pyproject.toml setup.py README.md LICENSE alembic.ini ./
COPY hybridinval ./hybridinval
COPY workers ./workers
COPY alembic ./alembic
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install ".[deploy]" \
    && python -c "import hybridinval._speedups" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app
USER app

# The processes run workers/ from /app (gunicorn, celery and alembic put it on sys.path).
EXPOSE 8000
CMD ["gunicorn", "-c", "python:workers.gunicorn_conf", "workers.web:app"]
