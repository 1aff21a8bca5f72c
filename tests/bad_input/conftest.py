"""The bad-input suite: parse the Trainer's and the stages' docstrings once per process, not once per case."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from docstring_parser.attrdoc import AttributeDocstrings


@pytest.fixture(scope="session", autouse=True)
def attribute_docstrings_parsed_once() -> Iterator[None]:
    """Every case builds the full ``lit-saferlhf fit`` parser, which reads each class's source for its
    attribute docstrings (most of a case's second); the sources do not change within a run."""
    original = AttributeDocstrings.get_attr_docs
    cache: dict[Any, dict] = {}

    def get_attr_docs(self: AttributeDocstrings, component: Any) -> dict:
        if component not in cache:
            cache[component] = original(self, component)
        return dict(cache[component])

    AttributeDocstrings.get_attr_docs = get_attr_docs
    yield
    AttributeDocstrings.get_attr_docs = original
