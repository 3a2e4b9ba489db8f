"""uproxy's tests. A package, so every test module and the harness (``tests.support``)
import the same way under pytest and when run as a program (``python -m tests.k8s...``)."""
