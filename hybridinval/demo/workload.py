"""The workload: driver threads that read and update users through the web processes and the
Celery worker, recording every read and committed write in a :class:`~.history.History`."""

from __future__ import annotations

import json
import logging
import random
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

from .history import History, Read

__all__ = ["HTTP_TIMEOUT", "TASK_TIMEOUT", "Workload", "http"]

log = logging.getLogger("hybridinval.demo")

HTTP_TIMEOUT = 10.0
TASK_TIMEOUT = 30.0


def http(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        payload: dict[str, Any] = json.loads(response.read())
        return payload


class Workload:
    """Driver threads: HTTP readers, an HTTP writer (both over every web and API process), and
    one thread for tasks."""

    def __init__(
        self,
        web_urls: list[str],
        celery: Any,
        queue: str,
        user_ids: list[int],
        history: History,
        readers: int,
    ) -> None:
        self.web_urls = web_urls
        self.celery = celery
        self.queue = queue
        self.user_ids = user_ids
        self.history = history
        self.readers = readers
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.counter = 0

    def start(self) -> None:
        targets: list[Callable[[], None]] = [self.http_reader] * self.readers
        targets += [self.http_writer, self.tasks]
        for i, target in enumerate(targets):
            thread = threading.Thread(
                target=self._guard, args=(target,), name=f"demo-driver-{i}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TASK_TIMEOUT + HTTP_TIMEOUT)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # reported in the summary; the demo then fails
            if self.stop.is_set():
                return  # stopping (Ctrl-C, a process died): the error is not news
            self.history.error(f"{threading.current_thread().name}: {exc!r}")
            log.exception("driver thread failed")

    def _name(self) -> str:
        self.counter += 1
        return f"name-{self.counter}-{random.randrange(10**6)}"

    def http_reader(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            user_id = rng.choice(self.user_ids)
            body = http("GET", f"{rng.choice(self.web_urls)}/users/{user_id}")
            self.history.read(
                Read(user_id, body["user"]["version"], body["started_ns"], body["process"])
            )

    def http_writer(self) -> None:
        rng = random.Random()
        while not self.stop.wait(0.02):
            user_id = rng.choice(self.user_ids)
            body = http(
                "PUT", f"{rng.choice(self.web_urls)}/users/{user_id}", {"name": self._name()}
            )
            self.history.commit(user_id, body["user"]["version"], body["committed_ns"])

    def tasks(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            reads = [rng.choice(self.user_ids) for _ in range(4)]
            writer = rng.choice(self.user_ids)
            pending = [
                self.celery.send_task("workers.read_user", (u,), queue=self.queue) for u in reads
            ]
            update = self.celery.send_task(
                "workers.update_user", (writer,), {"name": self._name()}, queue=self.queue
            )
            for user_id, result in zip(reads, pending, strict=True):
                body = result.get(timeout=TASK_TIMEOUT)
                self.history.read(
                    Read(user_id, body["user"]["version"], body["started_ns"], body["process"])
                )
            body = update.get(timeout=TASK_TIMEOUT)
            self.history.commit(writer, body["user"]["version"], body["committed_ns"])
