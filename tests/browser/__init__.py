"""Viewer tests: routes over HTTP and the page in headless Chromium."""
