"""Test support code shared by several test suites (fakes, helpers)."""
