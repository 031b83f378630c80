"""Headless Chromium for the web UI's tests: Debian's chromium and
chromium-driver through python3-selenium.

Loopback only (a proxy that goes nowhere for everything else, so a page
that tries to reach the internet shows up in the network log as a failed
request instead of leaving the machine), bounded timeouts, screenshots
under the test's tmp directory (checked not blank), and the browser's own
console and network logs (goog:loggingPrefs, the performance log)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT = 10.0
AXE = Path(__file__).resolve().parents[2] / ".cache/npm/node_modules/axe-core/axe.min.js"


class Browser:
    def __init__(self, base_url: str, directory: Path, *, width: int = 1280, height: int = 900,
                 lang: str | None = None):
        """LANG: the browser's language (e.g. "de-DE"): its UI language and
        the Accept-Language it sends (its primary tag after it, q=0.9)."""
        self.base = base_url.rstrip("/")
        self.dir = Path(directory)
        self.downloads = self.dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        o = webdriver.ChromeOptions()
        o.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  f"--user-data-dir={self.dir / 'profile'}", f"--window-size={width},{height}",
                  # Everything but loopback goes to a proxy that is not there.
                  "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>;127.0.0.1",
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
            o.add_argument(a)
        prefs = {"download.default_directory": str(self.downloads), "download.prompt_for_download": False}
        if lang:
            o.add_argument(f"--lang={lang}")
            primary = lang.split("-")[0]
            prefs["intl.accept_languages"] = lang if primary == lang else f"{lang},{primary}"
        o.accept_insecure_certs = True      # the test stack's own CA, on 127.0.0.1 only
        o.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        o.add_experimental_option("prefs", prefs)
        self.driver = webdriver.Chrome(options=o, service=Service(CHROMEDRIVER, log_output=str(self.dir / "chromedriver.log")))
        self.driver.set_page_load_timeout(TIMEOUT)
        self.driver.set_script_timeout(TIMEOUT)
        self.driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                                    {"behavior": "allow", "downloadPath": str(self.downloads)})
        if width < 500:
            # A desktop window cannot be made this narrow: emulate the phone.
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
        self.console: list[dict] = []
        self.network: list[dict] = []

    # --- driving ---

    def get(self, path: str) -> None:
        self.driver.get(self.base + path)

    def find(self, css: str):
        try:
            return WebDriverWait(self.driver, TIMEOUT).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))
        except Exception:
            raise AssertionError(f"no {css} at {self.driver.current_url}\n{self.driver.page_source[:2000]}") \
                from None

    def all(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def path(self) -> str:
        url = self.driver.current_url
        return url[len(self.base):] if url.startswith(self.base) else url

    def wait_path(self, prefix: str) -> None:
        try:
            WebDriverWait(self.driver, TIMEOUT).until(lambda d: self.path().startswith(prefix))
        except Exception:
            raise AssertionError(f"not at {prefix}: at {self.driver.current_url}\n"
                                 f"{self.driver.page_source[:2000]}") from None

    def wait_gone(self, element, timeout: float = TIMEOUT) -> None:
        """Wait until `element` is no longer in the document (the page it
        was on has been replaced).  During the navigation chromedriver may
        answer "Node with given id does not belong to the document" (a
        WebDriverException, not StaleElementReferenceException, which is
        what EC.staleness_of expects): that is gone too."""
        from selenium.common.exceptions import WebDriverException

        def gone(_):
            try:
                element.is_enabled()
            except WebDriverException:          # StaleElementReferenceException is one
                return True
            return False
        try:
            WebDriverWait(self.driver, timeout).until(gone)
        except Exception:
            raise AssertionError(f"the old page is still there at {self.driver.current_url}") from None

    def wait_url_has(self, text: str) -> None:
        """Wait until the page's URL contains `text` (a search answered in
        place changes only its query string)."""
        try:
            WebDriverWait(self.driver, TIMEOUT).until(lambda d: text in self.path())
        except Exception:
            raise AssertionError(f"no {text!r} in {self.driver.current_url}") from None

    def wait_at(self, path: str) -> None:
        """Wait until the page's path (without its query) is exactly `path`:
        wait_path("/account") is already true on /account/totp/begin."""
        try:
            WebDriverWait(self.driver, TIMEOUT).until(lambda d: self.path().split("?", 1)[0] == path)
        except Exception:
            raise AssertionError(f"not at {path}: at {self.driver.current_url}\n"
                                 f"{self.driver.page_source[:2000]}") from None

    def login(self, username: str, password: str, tenant: str | None) -> None:
        self.find("#username")
        if tenant:
            self.find("#tenant").clear()
            self.find("#tenant").send_keys(tenant)
        self.find("#username").clear()
        self.find("#username").send_keys(username)
        self.find("#password").send_keys(password)
        self.find("#login-submit").click()

    def wait_download(self, name: str, timeout: float = TIMEOUT) -> bytes:
        target = self.downloads / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if target.exists() and not list(self.downloads.glob("*.crdownload")):
                return target.read_bytes()
            time.sleep(0.1)
        raise AssertionError(f"no download {name}: {sorted(p.name for p in self.downloads.iterdir())}")

    # --- evidence ---

    def screenshot(self, name: str) -> Path:
        """A PNG of the page, checked not blank: its decompressed pixel
        data must hold many distinct byte values (a one-colour page, after
        PNG's row filters, holds a handful)."""
        import struct
        import zlib

        p = self.dir / f"{name}.png"
        assert self.driver.save_screenshot(str(p)), p
        data, pos, idat = p.read_bytes(), 8, b""
        while pos < len(data):
            n, kind = struct.unpack(">I4s", data[pos:pos + 8])
            if kind == b"IDAT":
                idat += data[pos + 8:pos + 8 + n]
            pos += 12 + n
        assert len(set(zlib.decompress(idat))) > 16, f"blank screenshot {p}"
        return p

    def logs(self) -> None:
        """Collect the console and network logs since the last call."""
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] in ("Network.requestWillBeSent", "Network.loadingFailed", "Network.responseReceived"):
                self.network.append(msg)

    def requested_urls(self) -> list[str]:
        self.logs()
        return [m["params"]["request"]["url"] for m in self.network if m["method"] == "Network.requestWillBeSent"]

    def axe(self, name: str = "") -> list[dict]:
        """axe-core's serious and critical violations on the current page
        (axe.min.js from `make deps`: .cache/npm)."""
        if not AXE.is_file():
            raise AssertionError(f"{AXE} is missing: run `make deps`")
        self.driver.execute_script(AXE.read_text(encoding="utf-8"))
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));")
        assert isinstance(result, list), result
        return [{"page": name or self.path(), "id": v["id"], "impact": v["impact"], "help": v["help"],
                 "nodes": [n["target"] for n in v["nodes"]][:5]}
                for v in result if v.get("impact") in ("serious", "critical")]

    def close(self) -> None:
        try:
            self.driver.quit()
        except Exception:  # noqa: BLE001
            pass
