"""Pydantic v2 models of the mprun pipeline file (format version 1)."""

from schemas.pipeline import Pipeline, QueueSpec, Settings, TestCase, topology_problems
from schemas.stages import Consumer, FileSource, Pool, Producer, RangeSource, Source, Stage

__all__ = [
    "Consumer",
    "FileSource",
    "Pipeline",
    "Pool",
    "Producer",
    "QueueSpec",
    "RangeSource",
    "Settings",
    "Source",
    "Stage",
    "TestCase",
    "topology_problems",
]
