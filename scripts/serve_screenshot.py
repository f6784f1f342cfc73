"""Screenshot the server's web page holding a conversation about an example image (docs/serving/page.png).

    python scripts/serve_screenshot.py [--build builds/default] [--out docs/serving/page.png] [--force]
                                       [--image IMAGE] [--question Q1 --question Q2 ...]

Starts `python -m serving` on the build (a free port on 127.0.0.1), opens the page in headless
Chromium (the distribution's /usr/bin/chromium and /usr/bin/chromedriver; selenium-manager is never
used, it would try to download a browser), chooses the image through the page's own file input, asks
the questions one after the other (each a follow-up in the same conversation) with its Ask button,
waits for each answer and the latest answer's kept-token overlay, and saves the window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving.http.process import ServerStartError, serve_subprocess  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Three turns about examples/shapes_mixed.png (examples/questions.json): the history and a follow-up show.
QUESTIONS = (
    "How many squares are there?",
    "What colour is the triangle?",
    "Is the blue star above or below the white square?",
)


class ScreenshotError(RuntimeError):
    """A one-line reason the screenshot could not be made."""


def browser(width: int, height: int):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise ScreenshotError("selenium is not installed: pip install -e '.[test]'") from None
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            raise ScreenshotError(f"{path} is missing; install the distribution's {package} package")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    # The window size includes the browser's frame, and headless windows have a minimum width: set the
    # page's own viewport (what the screenshot holds) to exactly width x height.
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


def page_state(driver) -> str | None:
    return driver.execute_script("return document.body.dataset.state")


def screenshot(args: argparse.Namespace) -> None:
    with serve_subprocess(args.build) as server:
        try:
            server.wait_ready(args.timeout)
        except ServerStartError as e:
            raise ScreenshotError(str(e).splitlines()[0]) from None
        turns, kept = drive(args, server.url)
    shown = "; ".join(f"{q!r} -> {a!r}" for q, a in turns)
    print(f"wrote {args.out} ({shown}; {kept})")


def answered(driver) -> int:
    """The turns of the page's history with a complete answer (their figures line is filled in)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#history .turn-meta')].filter((e) => e.textContent).length"
    )


def drive(args: argparse.Namespace, url: str) -> tuple[list[tuple[str, str]], str]:
    """Hold the conversation through the page and save the screenshot; -> ([(question, answer)], kept line)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(args.width, args.height)
    try:
        driver.get(f"{url}/")
        driver.find_element(By.ID, "image-input").send_keys(str(args.image.resolve()))
        for turn, question in enumerate(args.question or QUESTIONS):
            driver.find_element(By.ID, "question").send_keys(question)
            driver.find_element(By.ID, "ask").click()
            # The page sets data-state on <body>: "done" once this turn's answer and the overlay are drawn.
            WebDriverWait(driver, args.timeout).until(
                lambda d, turn=turn: page_state(d) == "error" or (page_state(d) == "done" and answered(d) > turn)
            )
            if page_state(driver) == "error":
                raise ScreenshotError(f"the page shows an error: {driver.find_element(By.ID, 'error').text}")
        driver.execute_script("document.activeElement.blur()")  # no focus ring or caret in the picture
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(args.out)):
            raise ScreenshotError(f"the browser could not write {args.out}")
        turns = [
            (t.find_element(By.CLASS_NAME, "question").text, t.find_element(By.CLASS_NAME, "answer").text)
            for t in driver.find_elements(By.CSS_SELECTOR, "#history .turn")
        ]
        return turns, driver.find_element(By.ID, "kept").text
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=REPO / "builds" / "default", help="build directory")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "serving" / "page.png", help="the PNG to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "shapes_mixed.png", help="image to ask about")
    parser.add_argument(
        "--question",
        action="append",
        help="a question; repeat it for follow-ups in the same conversation (default: three about the default image)",
    )
    parser.add_argument("--width", type=int, default=1200, help="window width (default 1200)")
    parser.add_argument("--height", type=int, default=1000, help="window height (default 1000)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server and the answer")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if not (args.build / "manifest.json").is_file():
        print(
            f"error: {args.build} is not a build (no manifest.json); make one with python -m export build",
            file=sys.stderr,
        )
        return 2
    if not args.image.is_file():
        print(f"error: {args.image} does not exist; pass an image with --image", file=sys.stderr)
        return 2
    try:
        screenshot(args)
    except ScreenshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # selenium's errors are many lines (a stack trace from the driver): keep the first
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
