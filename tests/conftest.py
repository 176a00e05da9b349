"""Tests marked ``port`` need torch, torchvision and timm (the ``port`` extra, several GB); without
them they skip, saying how to run them."""

import importlib.util

import pytest

PORT_HINT = "needs torch, torchvision and timm: pip install -e '.[test,port]' && python -m pytest -m port"


def pytest_collection_modifyitems(config, items):
    if all(importlib.util.find_spec(name) for name in ("torch", "torchvision", "timm")):
        return
    for item in items:
        if "port" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=PORT_HINT))
