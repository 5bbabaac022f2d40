"""The analyst's console, served by `facegate api` at `/`: pages and forms (router.py), sign-in sessions
(sessions.py), Jinja2 templates and its own script and style (templates/, static/)."""
