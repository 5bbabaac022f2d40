"""The worker's Celery application: `celery -A workers.app worker` or `facegate worker`."""

from facegate.queue import make_celery
from facegate.settings import get_settings
from workers.tasks import register_tasks

settings = get_settings()
app = make_celery(settings)
app.conf.worker_pool = settings.worker_pool
app.conf.worker_concurrency = settings.worker_concurrency
register_tasks(app)

from workers.compare import register_compare_task  # noqa: E402  (evaluation's pair comparisons)

register_compare_task(app)
