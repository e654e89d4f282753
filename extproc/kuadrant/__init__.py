"""Kuadrant integration: the Limitador reporter and the policy watcher."""
