"""The face pipeline and the Celery tasks that run it: decode, detect (MTCNN), embed (InceptionResnetV1), store."""
