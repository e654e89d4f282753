"""Offline checks of the cluster deployment in deploy/ and the Containerfile."""
