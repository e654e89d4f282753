"""The subscription era of MaaS: API keys, MaaSSubscription selection, per-model token rates."""
