"""Isolate the data lookup path and forbid network access in every test here."""

from __future__ import annotations

import pytest

from lightning_curvature.data import sources


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    """Empty search path (no env var, temp cache, no system dirs) and no network."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", (str(tmp_path / "system"),))

    def no_network(url, timeout=60.0):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(sources, "download_url", no_network)
    return tmp_path
