"""Tasks that use current_cache() run eagerly (task_always_eager), as in an application's tests."""

from __future__ import annotations

import pytest
from celery import Celery

from hybridinval import HybridCache, NoWorkerCacheError
from hybridinval import celery as hybrid_celery
from hybridinval.testing import MemoryHub, MemoryL2


def test_an_eager_task_reads_the_cache_the_test_opened() -> None:
    app = Celery("eager", broker="memory://")
    app.conf.task_always_eager = True
    l2, hub = MemoryL2(), MemoryHub()
    integration = hybrid_celery.install(
        app, lambda: HybridCache(l2=l2, transport=hub.transport(), namespace="eager")
    )

    @app.task
    def show(user_id: int) -> object:
        return hybrid_celery.current_cache().get(f"user:{user_id}")

    try:
        with pytest.raises(NoWorkerCacheError, match="open_process_cache"):
            show.delay(1).get()
        cache = integration.open_process_cache(reason="test")
        assert cache is not None and hybrid_celery.current_cache() is cache
        assert integration.open_process_cache() is cache, "idempotent"
        cache.set("user:1", {"id": 1})
        assert show.delay(1).get() == {"id": 1}
        integration.close_process_cache()
        with pytest.raises(NoWorkerCacheError):
            hybrid_celery.current_cache()
    finally:
        integration.close_process_cache()
        integration.uninstall()
