"""`revenant agent`: the node daemon that turns spot-interruption notices into final checkpoints.

notice: the Notice type and the Watcher interface; aws, gcp, azure: one watcher per cloud; detect:
provider auto-detection; drain: the concurrent Checkpoint fan-out over the node registry; metrics:
Prometheus exposition and /healthz; daemon: the poll loop that ties them together; cli: the
`revenant agent` and `revenant drain` sub-commands.
"""
