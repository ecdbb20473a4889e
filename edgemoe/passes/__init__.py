"""Compiler stages: plain functions over frozen dataclasses, one per module."""
