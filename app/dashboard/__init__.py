"""The read-only web dashboard under /dashboard (docs/dashboard.md): runs, their metrics and op
timelines, checkpoints, workers and the queue, as server-rendered HTML with inline SVG."""
