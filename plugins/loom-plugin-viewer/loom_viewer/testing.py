"""Headless Chromium for the viewer's browser tests and its screenshots script (selenium, Debian's ``chromium`` and
``chromium-driver``): one browser, what it fetched and what it logged.

Selenium is a test dependency, imported inside the functions."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def browser_paths() -> tuple[str, str] | None:
    """(browser, driver) executables, or None where they are not installed."""
    browser = os.environ.get("LOOM_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM)), None)
    driver = os.environ.get("LOOM_CHROMEDRIVER") or shutil.which(DRIVER)
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium under selenium that logs the console and the network (read with the functions below)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError("no chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for Chromium's sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--disable-background-networking",  # no update checks, field trials or safe-browsing lists from the browser
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for since the last call (the DevTools network log, which the call empties)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def foreign(urls: list[str], origin: str) -> list[str]:
    """The URLs that are not on ``origin`` (scheme, host and port)."""
    own = urlsplit(origin)
    return [u for u in urls if (urlsplit(u).scheme, urlsplit(u).netloc) != (own.scheme, own.netloc)]


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The console's errors since the last call (SEVERE entries: exceptions, failed loads, CSP violations)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 120) -> Any:
    """Wait until ``condition(driver)`` holds; ``timeout`` only bounds a page that would never get there."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def settled(driver: Any) -> str:
    """Wait until the page's request is answered (the status line says done or error) and return that state."""
    return wait_for(
        driver,
        lambda d: d.execute_script(
            "const s = document.getElementById('status').dataset.state; return s === 'busy' ? null : s || null"
        ),
    )
