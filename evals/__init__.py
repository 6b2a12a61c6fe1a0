"""``make eval``: score a model locally, through the same server and HTTP contract HELM uses (no hub)."""
