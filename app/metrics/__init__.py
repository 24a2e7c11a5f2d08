"""Prometheus metrics (docs/metrics.md): what the durable rows say (queries.py), turned into metric
families at scrape time (collector.py), served by the API (app/api/routes/metrics.py, exporter.py).

Nothing here imports workers/ or torch: the workers' own numbers (GPU memory, snapshot writes) are
served by each worker on its own port (workers/metrics.py).
"""
