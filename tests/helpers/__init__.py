"""What tests of both tiers (tests/unit, tests/multirank) share beyond tests/conftest.py: one copy
each, imported as `helpers.<module>` (tests/ is on pytest's pythonpath)."""
