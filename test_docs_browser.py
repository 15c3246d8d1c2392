"""GET /docs in a real headless Chromium: the routes are listed, and an authorised request runs from the page."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from testkit import TEST_API_KEY

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_SECONDS = 30

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Chromium is not installed: run scripts/install_browser.sh (Debian packages chromium, chromium-driver)",
)

# No network beyond the page's own server, no background traffic, no state from earlier runs.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,2000"]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="docs-browser-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, css: str, root=None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    if root is None:
        return WebDriverWait(driver, WAIT_SECONDS).until(
            expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, css)))
    return WebDriverWait(driver, WAIT_SECONDS).until(lambda _: root.find_element(By.CSS_SELECTOR, css))


def authorise_with_api_key(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(driver, "button.btn.authorize").click()
    modal = wait_for(driver, ".modal-ux")
    api_key_section = next(section for section in modal.find_elements(By.CSS_SELECTOR, ".auth-container")
                           if "ApiKeyAuth" in section.text)
    api_key_section.find_element(By.CSS_SELECTOR, "input").send_keys(key)
    api_key_section.find_element(By.CSS_SELECTOR, "button.authorize").click()
    wait_for(driver, "button.btn-done").click()


def try_it_out(driver, operation_id: str) -> tuple[str, str]:
    """Expand an operation, press Try it out and Execute; the status and body the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Expanded with one click on a page opened without a deep link: a deep link expands the
    # operation while the page settles, and the click could then collapse it again.
    operation = wait_for(driver, f"#operations-{operation_id}")
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    wait_for(driver, f"#operations-{operation_id} button.try-out__btn").click()
    wait_for(driver, f"#operations-{operation_id} button.execute").click()
    status = wait_for(driver, ".live-responses-table .response .response-col_status", root=operation)
    WebDriverWait(driver, WAIT_SECONDS).until(lambda _: status.text.strip())
    body = operation.find_element(By.CSS_SELECTOR, ".live-responses-table .response-col_description pre").text
    return status.text.strip(), body


def test_docs_page_lists_every_route_and_runs_an_authorised_request(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/docs")
    wait_for(browser, ".opblock")
    listed = {element.get_attribute("data-path")
              for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    document = json.loads(browser.execute_script(
        "return fetch('/openapi.json').then(answer => answer.text())"))
    assert listed == set(document["paths"])

    authorise_with_api_key(browser, TEST_API_KEY)
    status, body = try_it_out(browser, "embeddings-embed_text")
    assert status.startswith("200"), body
    vector = json.loads(body)["embeddings"][0]
    assert len(vector) == 384 and all(isinstance(value, float) for value in vector)

    # Everything the page loaded came from this service: it works with no network.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert loaded and all(url.startswith(server.url + "/") for url in loaded), loaded


def test_docs_page_without_the_key_gets_401(server, browser):
    browser.get("about:blank")  # a fresh page: the key entered in the other test is forgotten
    browser.get(server.url + "/docs")
    status, body = try_it_out(browser, "openai-list_models")
    assert status.startswith("401"), body
