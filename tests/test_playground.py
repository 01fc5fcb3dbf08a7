"""The playground page of ``mmrec serve`` in a real browser: headless Chromium (the Debian packages
``chromium`` and ``chromium-driver``) driven by selenium against a real uvicorn server.

Nothing is downloaded at run time: the browser and its driver are found on PATH (or named by
MMREC_CHROMIUM / MMREC_CHROMEDRIVER) and handed to selenium by path, so Selenium Manager never runs.
Skipped, saying why, when either is missing. The screenshot goes to $MMREC_ARTIFACTS when it is set,
else to the test's tmp_path; the test prints where.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

import mmrec  # noqa: E402
from mmrec.serve.app import create_app  # noqa: E402
from serve_support import LiveServer, lively_checkpoint  # noqa: E402

MODEL = "run"
KEY = "playground-key"
TURNS = ["The cat ", "sat on the "]
MAX_TOKENS = 24


def _browser_paths() -> tuple[str, str]:
    browser = os.environ.get("MMREC_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = os.environ.get("MMREC_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "no headless Chromium found (needs chromium and chromedriver on PATH, or MMREC_CHROMIUM and "
            "MMREC_CHROMEDRIVER): apt-get install chromium chromium-driver"
        )
    return browser, driver


@pytest.fixture
def browser():  # noqa: ANN201
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,1300",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _artifact(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("MMREC_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_playground_streams_a_session_in_chromium(browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run = lively_checkpoint(tmp_path / MODEL)
    state_bytes = mmrec.load(run).model.init_state(1).nbytes()

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def field(element_id: str, value: str) -> None:
        element = browser.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)

    def send(prompt: str) -> None:
        field("prompt", prompt)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda _: text("status") not in ("", "Streaming\u2026"))
        assert text("status") == "Done.", text("status")

    with LiveServer(create_app(run, sessions_dir=tmp_path / "s", api_keys=[KEY])) as server:
        client = server.client(api_key=KEY)
        browser.get(server.url + "/")
        # Without the key the server refuses the model list, and the page says so.
        WebDriverWait(browser, 30).until(lambda _: "401" in text("status"))
        field("api-key", KEY)
        browser.find_element(By.ID, "reload-models").click()
        WebDriverWait(browser, 30).until(lambda _: len(Select(browser.find_element(By.ID, "model")).options) == 1)
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == MODEL

        field("session", "page-talk")
        field("max-tokens", str(MAX_TOKENS))
        field("temperature", "0")
        send(TURNS[0])
        WebDriverWait(browser, 30).until(lambda _: text("turns") == "1")
        first = text("reply")
        first_chunks = int(text("reply-chunks"))
        first_consumed = text("tokens-consumed")

        send(TURNS[1])
        WebDriverWait(browser, 30).until(lambda _: text("turns") == "2")
        second = text("reply")
        shown_state = text("state-bytes")
        consumed = text("tokens-consumed")
        transcript = text("transcript")
        listed = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#sessions tr")]
        shot = _artifact(tmp_path, "playground.png")
        assert browser.save_screenshot(str(shot))
        print(f"playground screenshot: {shot}")

        # What the page streamed is the model's greedy text for the session's whole history.
        expected_first = client.completions.create(model=MODEL, prompt=TURNS[0], max_tokens=MAX_TOKENS, temperature=0)
        history = TURNS[0] + first + TURNS[1]
        expected_second = client.completions.create(model=MODEL, prompt=history, max_tokens=MAX_TOKENS, temperature=0)
        session = client.get("/sessions/page-talk", cast_to=object)

    assert first == expected_first.choices[0].text and len(first) == MAX_TOKENS
    assert second == expected_second.choices[0].text
    assert first_chunks > 1  # it arrived piece by piece
    assert transcript == TURNS[0] + first + TURNS[1] + second
    assert first_consumed == str(len(TURNS[0]) + MAX_TOKENS)
    assert consumed == f"{sum(map(len, TURNS)) + 2 * MAX_TOKENS}" == str(session["tokens_consumed"])
    assert shown_state.startswith(f"{state_bytes:,} B") and session["state_bytes"] == state_bytes
    assert len(listed) == 1 and listed[0].startswith("page-talk")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
