"""The long-running process: config, watching, scheduling, the work queue, state and CLI."""
