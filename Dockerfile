# The image of the example deployment (workers/): web, worker and migration all run from it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that code changes do not reinstall them. The compiler is there only
# for the C hit path (hybridinval._speedups), and the build fails if that did not compile.
COPY pyproject.toml setup.py README.md ./
COPY hybridinval ./hybridinval
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install ".[deploy]" \
    && python -c "import hybridinval._speedups" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

COPY workers ./workers
COPY alembic ./alembic
COPY alembic.ini ./

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 8000
CMD ["gunicorn", "-c", "workers/gunicorn_conf.py", "workers.web:app"]
