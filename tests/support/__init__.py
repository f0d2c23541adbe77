"""Helpers shared by the test modules (no tests here; the fixtures are in conftest.py)."""
