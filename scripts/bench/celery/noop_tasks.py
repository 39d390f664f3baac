"""The Celery app of the baseline: one no-op task, Redis as broker and result backend."""
import os

from celery import Celery

URL = os.environ.get("CELERY_BENCH_REDIS", "redis://127.0.0.1:6390/0")
app = Celery("noop_tasks", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task
def noop():
    """Does nothing: the figure is the queue's own cost per task."""
    return None
