"""Jobs: split index and search work into chunks, queue them by task name, track progress, assemble results."""
