"""The worker's Celery application: `celery -A workers.app worker` or `facegate worker`."""

import workers.tasks  # noqa: F401  (declares the tasks, at module level: every app this process makes has them)
from facegate.queue import make_celery
from facegate.settings import get_settings

settings = get_settings()
app = make_celery(settings)
app.conf.worker_pool = settings.worker_pool
app.conf.worker_concurrency = settings.worker_concurrency
