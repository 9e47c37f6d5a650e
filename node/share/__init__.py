"""Sharing exams with the coordinator: signed manifests and resumable uploads."""
