"""A real Prometheus server on loopback, for tests and local development, and `promtool`.

    with LocalPrometheus(["127.0.0.1:9101", "127.0.0.1:9102"]) as prom:
        prom.wait_for_scrape()
        prom.query("sum(rate(tandem_requests_total[1m]))")   # the API's "data" object

Runs Debian's `prometheus` binary (package `prometheus`, not started as a service) with a
config and a TSDB in a private temp dir, on a free loopback port; `stop()` ends it and
removes the dir. Prometheus needs a few seconds to its first scrape here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from cluster.addresses import free_port

INSTALL_HINT = ("install Debian's Prometheus package: "
                "`apt-get install -y --no-install-recommends prometheus` "
                "(it provides both `prometheus` and `promtool`)")


class PromQLError(Exception):
    """Prometheus answered a query with an error (`error_type` "bad_data": invalid PromQL)."""

    def __init__(self, error_type: str, message: str, query: str) -> None:
        super().__init__(f"{error_type}: {message} (query: {query})")
        self.error_type = error_type
        self.message = message
        self.query = query


def find_binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; FileNotFoundError naming the package if absent."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH: {INSTALL_HINT}")
    return path


def promtool(*args: str, stdin: str | None = None,
             timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Runs `promtool ARGS` and returns the completed process (the caller checks `returncode`)."""
    return subprocess.run([find_binary("promtool"), *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


class LocalPrometheus:
    """One `prometheus` process scraping `targets` ("host:port", path /metrics)."""

    def __init__(self, targets: Sequence[str], scrape_interval: str = "1s", job: str = "tandem",
                 rule_files: Sequence[str | Path] = (), start_timeout_s: float = 30.0) -> None:
        self.binary = find_binary("prometheus")
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.job = job
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.start_timeout_s = start_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-prometheus-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "prometheus.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML: no yaml dependency needed
            "global": {"scrape_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": self.job,
                                "static_configs": [{"targets": self.targets}]}],
        }, indent=2))
        for _attempt in range(3):  # the free port can be taken before prometheus binds it
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [self.binary, f"--config.file={config}",
                     f"--storage.tsdb.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready():
                return
        self.stop(remove=False)
        raise RuntimeError(f"prometheus did not become ready; log {self.log_path}:\n"
                           f"{self.log()[-3000:]}")

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as reply:
                    if reply.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.process.kill()
        self.process.wait()
        return False

    def stop(self, remove: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- the HTTP API --------------------------------------------------------------------

    def api(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET /api/v1/<path>; the whole JSON reply, including error replies (HTTP 4xx)."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10.0) as reply:
                body: dict[str, Any] = json.load(reply)
        except urllib.error.HTTPError as error:  # 400 bad_data, 422 execution: JSON too
            body = json.load(error)
        return body

    def query(self, promql: str, at: float | None = None) -> dict[str, Any]:
        """An instant query; the reply's `data` ({"resultType", "result"}); PromQLError if
        Prometheus refuses it (invalid PromQL is `error_type` "bad_data")."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = self.api("query", params)
        if body.get("status") != "success":
            raise PromQLError(str(body.get("errorType")), str(body.get("error")), promql)
        data: dict[str, Any] = body["data"]
        return data

    def targets_health(self) -> dict[str, str]:
        """{"host:port": "up" | "down" | "unknown"} of the active targets."""
        active = self.api("targets")["data"]["activeTargets"]
        return {t["labels"]["instance"]: t["health"] for t in active}

    def wait_for_scrape(self, timeout_s: float = 30.0, scrapes: int = 1) -> None:
        """Waits until every target was scraped successfully, then `scrapes - 1` more rounds."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.targets_health()
            if len(health) == len(self.targets) and all(h == "up" for h in health.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not all scraped after {timeout_s} s: {health}; "
                                   f"log:\n{self.log()[-2000:]}")
            time.sleep(0.2)
        if scrapes > 1:
            time.sleep((scrapes - 1) * _seconds(self.scrape_interval))


def _seconds(duration: str) -> float:
    """A Prometheus duration of one unit ("1s", "500ms", "2m") in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit) and duration[: -len(unit)].isdigit():
            return int(duration[: -len(unit)]) * units[unit]
    raise ValueError(f"scrape_interval: {duration!r} is not like 1s, 500ms or 2m")
