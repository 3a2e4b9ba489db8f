"""The namespace lab itself and the demo walkthrough built on it."""
