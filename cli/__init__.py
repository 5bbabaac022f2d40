"""The `facegate` command line: submits jobs, runs workers, and starts the embedded broker when none is configured."""
