"""The fleet manager: registries, signed releases, rollouts, ingestion, dashboard."""
