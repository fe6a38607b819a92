"""Celery adapters: thin tasks around the plain async functions in service/."""
