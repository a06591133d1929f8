"""Async prediction jobs: submit now, poll later. Two stores share one interface."""
