"""What ships beside the code: the Kubernetes manifests (deploy/) and the compose stack."""
