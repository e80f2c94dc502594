"""Headless Chromium for the browser tests: the Debian package, driven by Playwright.

The browser is ``/usr/bin/chromium`` (``scripts/test`` installs it with apt when missing);
Playwright's own browser downloads are never used. Without that binary the browser tests fail
with a message saying how to install it: a skipped browser test would hide a broken page.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    Page,
    sync_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the duration of the block (fails the test without one)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (scripts/test installs it: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class PageProblems:
    """What a page did wrong while a test drove it: uncaught errors and CSP violations.

    Console errors in general are not collected: Chromium logs every 4xx answer of fetch as
    one, and the pages meet 404s and 409s on purpose.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def on_console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            self.errors.append(f"CSP: {message.text}")

    def on_page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error.message}")


@dataclass(frozen=True)
class Screen:
    """A device the pages are tried on."""

    name: str
    width: int
    height: int
    mobile: bool = False


DESKTOP = Screen("desktop", 1280, 900)
#: A small phone (iPhone SE / mini class), with touch and the mobile viewport rules.
PHONE = Screen("phone", 375, 667, mobile=True)
SCREENS = (DESKTOP, PHONE)


@contextmanager
def browser_context(
    browser: Browser, base_url: str, screen: Screen | None = None
) -> Iterator[BrowserContext]:
    """A fresh context (its own cookies and storage: a new visitor) that fails the test if
    any of its pages threw an uncaught error or broke the Content-Security-Policy."""
    if screen is None:
        context = browser.new_context(base_url=base_url, viewport={"width": 900, "height": 900})
    else:
        context = browser.new_context(
            base_url=base_url,
            viewport={"width": screen.width, "height": screen.height},
            is_mobile=screen.mobile,
            has_touch=screen.mobile,
            device_scale_factor=2 if screen.mobile else 1,
        )
    context.set_default_timeout(10_000)
    problems = PageProblems()
    context.on("console", problems.on_console)
    context.on("weberror", lambda web_error: problems.on_page_error(web_error.error))
    try:
        yield context
    finally:
        context.close()
    assert not problems.errors, problems.errors


def assert_fits(page: Page) -> None:
    """Nothing on the page is wider than the screen (no sideways scrolling on a phone)."""
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1], f"the page is {widths[0]} px wide on a {widths[1]} px screen"


def visible_text(page: Page) -> str:
    """The text a sighted fan sees: rendered, and not only for screen readers."""
    text: str = page.evaluate(
        """() => {
          const parts = [];
          const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
          for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const parent = node.parentElement;
            if (!parent || !node.textContent.trim()) continue;
            if (parent.closest(".visually-hidden, noscript, script, style")) continue;
            if (!parent.checkVisibility()) continue;
            parts.push(node.textContent.trim());
          }
          return parts.join("\\n");
        }"""
    )
    return text
