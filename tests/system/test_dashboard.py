"""The dashboard in headless Chromium against a daemon whose model is training: the page loads
with no console errors, every chart draws data points, the tables fill, and it keeps updating."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from adamd.client import Client
from adamd.server import Daemon

from ..conftest import running_daemon

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHARTS = ("loss", "grad", "lr", "rate", "lag", "time", "scalars")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian chromium and chromedriver",
    ),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1440,2000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Trainer:
    """Two async workers fitting a small regression through the server, with losses and a scalar,
    until stopped: the page must show a run that is moving."""

    def __init__(self, daemon: Daemon, name: str):
        self.daemon, self.name = daemon, name
        self.stop = threading.Event()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        with Client(daemon.grpc_address) as c:
            c.create_model(
                name, {k: v.detach() for k, v in net.named_parameters()}, lr=0.01, mode="async"
            )
        self.threads = [threading.Thread(target=self.run, args=(r,)) for r in range(2)]

    def run(self, rank: int) -> None:
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        with Client(self.daemon.grpc_address) as c:
            while not self.stop.is_set():
                pulled = c.pull(self.name)
                with torch.no_grad():
                    for k, p in net.named_parameters():
                        p.copy_(pulled.params[k])
                net.zero_grad()
                loss = torch.nn.functional.mse_loss(net(self.x), self.y)
                loss.backward()
                grads = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
                c.push_grad(
                    self.name,
                    grads,
                    version=pulled.version,
                    rank=rank,
                    loss=float(loss.detach()),
                    scalars={"rmse": float(loss.detach()) ** 0.5},
                )
                time.sleep(0.005)

    def __enter__(self) -> Trainer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def chart_points(driver: Any) -> dict[str, int]:
    return driver.execute_script(
        "const out = {};"
        "for (const c of document.querySelectorAll('.chart-card')) {"
        "  out[c.id.slice(6)] = Number(c.querySelector('canvas').dataset.points); }"
        "return out;"
    )


def inked_pixels(driver: Any, chart: str) -> int:
    """Pixels of the chart's canvas that are not transparent: drawn lines, ticks and labels."""
    return driver.execute_script(
        "const c = document.querySelector('#chart-' + arguments[0] + ' canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;",
        chart,
    )


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_dashboard_renders_live_training(browser: Any, tmp_path: Path) -> None:
    with running_daemon() as daemon, Trainer(daemon, "dash-demo"):
        with Client(daemon.grpc_address) as c:  # a second model, listed in the sidebar
            c.create_model("idle-model", {"w": torch.zeros(3)})
        browser.get(f"{daemon.http_url}/#dash-demo")
        assert browser.title == "adamd dashboard"
        points = wait_for(
            lambda: (p := chart_points(browser)) and all(p[k] >= 20 for k in CHARTS) and p
        )
        assert points and all(points[k] >= 20 for k in CHARTS), points
        for chart in CHARTS:
            drawn = browser.execute_script(
                "return document.querySelector('#chart-' + arguments[0] + ' canvas').dataset.drawn",
                chart,
            )
            assert drawn == "data", chart
            assert inked_pixels(browser, chart) > 500, chart
        # The page keeps up with training: more loss points arrive without a reload.
        first = points["loss"]
        assert wait_for(lambda: chart_points(browser)["loss"] > first + 10)
        # Sidebar, header tiles and tables.
        models = browser.execute_script(
            "return [...document.querySelectorAll('#models .model')].map(e => e.dataset.model)"
        )
        assert models == ["dash-demo", "idle-model"]
        assert browser.find_element("id", "model-title").text == "dash-demo"
        assert wait_for(
            lambda: len(browser.find_elements("css selector", "#params tr")) == 1 + 4
        ), "parameter table"
        names = browser.execute_script(  # one read: the table is redrawn on every poll
            "return [...document.querySelectorAll('#params tr td:first-child')].map(e => e.textContent)"
        )
        assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert "fused" in browser.find_element("id", "groups").text
        assert browser.find_element("id", "status-text").text == "live"
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        keep = os.environ.get("ADAMD_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / "dashboard.png")
        # Choosing the other model switches the page to it.
        # The sidebar entry survives polls (keyed update), so the element found is the one clicked.
        entry = browser.find_element("css selector", '#models .model[data-model="idle-model"]')
        time.sleep(1.5)  # at least one poll between finding and clicking
        entry.click()
        assert wait_for(lambda: browser.find_element("id", "model-title").text == "idle-model")
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe


def test_dashboard_without_models(browser: Any) -> None:
    with running_daemon() as daemon:
        browser.get(f"{daemon.http_url}/")
        assert wait_for(lambda: browser.find_element("id", "status-text").text == "live")
        assert browser.find_element("id", "empty").is_displayed()
        assert "No models yet" in browser.find_element("id", "empty").text
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
