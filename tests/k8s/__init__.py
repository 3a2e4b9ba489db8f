"""Tests against a fake Kubernetes API server (tests/k8s/apiserver.py)."""
