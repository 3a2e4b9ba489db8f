"""Sources other than the Kubernetes API (tests/k8s): manifest files and directories."""
