"""Runnable example apps (FastAPI and aiohttp) that drive asyncflow workflows; tested in tests/acceptance."""
