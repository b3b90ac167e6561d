"""``imgpipe submit`` against a real Ray head started by ``ray start --head``.

The head runs in its own temp dir with its own ports and its own token (token
authentication is Ray's default for new clusters), and is stopped by process id:
``ray stop`` would stop every Ray instance on the machine, other tests' included.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import requests
from ray.exceptions import AuthenticationError

from pipeline import cli, submit
from pipeline.errors import JobFailed, UserError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ processes, by pid


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def _is_head_process(cmd: str, temp_dir: str, client_port: int) -> bool:
    """The head's processes name its temp dir, except the Ray Client proxy, which
    `ray start` always launches: that one is known by its (free, unique) port."""
    if temp_dir in cmd:
        return True
    return "ray.util.client.server" in cmd and f"--port={client_port}" in cmd.split()


def _tree(temp_dir: str, client_port: int) -> set[int]:
    """The head's processes and all their descendants (workers, dashboard modules,
    job drivers)."""
    table = _proc_table()
    pids = {pid for pid, (_, cmd) in table.items() if _is_head_process(cmd, temp_dir, client_port)}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                grew = True
    pids.discard(os.getpid())
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_tree(temp_dir: str, client_port: int, timeout: float = 10.0) -> set[int]:
    """SIGTERM, then SIGKILL, the head's processes; returns the ones still alive."""
    pids = _tree(temp_dir, client_port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = {p for p in pids if _alive(p)} | _tree(temp_dir, client_port)
        if not pids:
            break
    return pids


# ---------------------------------------------------------------------- the head


class Head:
    def __init__(self, address: str, token: str, temp_dir: str):
        self.address = address
        self.token = token
        self.temp_dir = temp_dir

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


def _client_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env["RAY_AUTH_TOKEN"] = token
    env.pop("RAY_AUTH_MODE", None)  # the client finds and sends the token without it
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def _ray_head(wait_for_jobs: bool = True):
    """A fresh `ray start --head` with its own temp dir, ports and token; with
    ``wait_for_jobs``, yields once an authenticated job listing answers, else as soon as
    `ray start` returns (the job agent may still be starting)."""
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # unix socket paths < 107 chars
    token = secrets.token_hex(32)
    token_path = Path(temp_dir) / "token"
    token_path.write_text(token)
    dash, client_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    # `python` in the job's entrypoint must be this interpreter, as on a real cluster image.
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path))
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={_free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--object-store-memory=100000000",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}"]
    address = f"http://127.0.0.1:{dash}"
    try:
        r = subprocess.run(cmd, env=env, cwd=temp_dir, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        deadline = time.monotonic() + 60
        while wait_for_jobs:  # the job API is up when an authenticated job listing answers
            req = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"Ray job server at {address} did not answer in 60 s"
            time.sleep(0.5)
        yield Head(address, token, temp_dir)
    finally:
        left = _stop_tree(temp_dir, client_port)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray head processes survived: {sorted(left)}"


@pytest.fixture(scope="module")
def head():
    with _ray_head() as h:
        yield h


@pytest.fixture
def client_env(head, monkeypatch):
    """In-process CLI calls: no RAY_ADDRESS, the head's token in RAY_AUTH_TOKEN."""
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    return head


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------------------- tests


def test_submit_right_after_ray_start(tmp_path, monkeypatch):
    """Submitting the moment `ray start --head` returns, before the head's job agent may be
    up ("No available agent to submit job", HTTP 500): retried, accepted once, run."""
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    with _ray_head(wait_for_jobs=False) as fresh:
        monkeypatch.setenv("RAY_AUTH_TOKEN", fresh.token)
        summary = submit.run(fresh.address, ["models", "list", "--registry", str(tmp_path)],
                             wait=True, quiet=True, retry_s=120)
        assert summary["status"] == "SUCCEEDED" and summary["duplicate"] is False
        jobs = fresh.client().list_jobs()
        assert [j.submission_id for j in jobs] == [summary["submission_id"]]  # exactly one job


class _StartingHeadProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy in front of a real head that plays a head still starting: the first
    ``refusals`` job submissions get Ray's own 500 "No available agent" answer; with
    ``drop_accepted``, the next one reaches the head and its answer is then lost (the
    connection closes unanswered). Everything else passes through."""

    def __init__(self, upstream: str, refusals: int, drop_accepted: bool):
        self.upstream, self.refusals, self.drop_accepted = upstream, refusals, drop_accepted
        self.posts = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _StartingHeadProxy

    def log_message(self, *args):  # quiet
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy = self.server
        if self.command == "POST" and self.path.rstrip("/") == "/api/jobs":
            proxy.posts += 1
            if proxy.refusals > 0:
                proxy.refusals -= 1
                return self._answer(500, b"No available agent to submit job, please try again later.")
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        req = urllib.request.Request(proxy.upstream + self.path, data=body or None, method=self.command,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        if self.command == "POST" and status == 200 and proxy.drop_accepted:
            proxy.drop_accepted = False
            self.close_connection = True  # accepted upstream; the answer never arrives
            return None
        return self._answer(status, data)

    def _answer(self, status: int, data: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if data[:1] in (b"{", b"[") else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _forward


@pytest.fixture
def starting_head(client_env):
    def start(refusals: int, drop_accepted: bool = False) -> _StartingHeadProxy:
        proxy = _StartingHeadProxy(client_env.address, refusals, drop_accepted)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        servers.append(proxy)
        return proxy

    servers: list[_StartingHeadProxy] = []
    yield start
    for proxy in servers:
        proxy.shutdown()
        proxy.server_close()


def test_no_available_agent_is_retried_and_submits_once(client_env, starting_head, tmp_path, capsys):
    """Ray's real client against a real head whose first 3 submissions are refused with
    its 500 "No available agent": retried with backoff, one job, which runs."""
    proxy = starting_head(refusals=3)
    n_jobs = len(client_env.client().list_jobs())
    rc = cli.main(["submit", "--address", proxy.address, "--wait", "--", "models", "list",
                   "--registry", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = _last_json(out)
    assert summary["status"] == "SUCCEEDED" and summary["duplicate"] is False
    assert err.count("not ready (Request failed with status code 500: No available agent") == 3
    assert proxy.posts == 4
    jobs = client_env.client().list_jobs()
    assert len(jobs) == n_jobs + 1 and summary["submission_id"] in [j.submission_id for j in jobs]


def test_an_accepted_submission_whose_answer_is_lost_is_not_repeated(client_env, starting_head, tmp_path):
    proxy = starting_head(refusals=1, drop_accepted=True)
    sid = f"lost-{uuid.uuid4().hex[:8]}"
    n_jobs = len(client_env.client().list_jobs())
    summary = submit.run(proxy.address, ["models", "list", "--registry", str(tmp_path)], wait=True,
                         submission_id=sid, quiet=True)
    assert summary["status"] == "SUCCEEDED" and summary["duplicate"] is False
    assert proxy.posts == 2  # refused, then accepted with the answer lost: found by its id, not resent
    jobs = client_env.client().list_jobs()
    assert len(jobs) == n_jobs + 1 and [j.submission_id for j in jobs].count(sid) == 1


def test_successful_job_subprocess(head, tmp_path):
    registry = tmp_path / "registry"
    env = _client_env(head.token)
    env["RAY_ADDRESS"] = "http://127.0.0.1:1"  # an explicit --address wins over the environment
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", head.address, "--wait",
                        "--", "models", "list", "--registry", str(registry), "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = _last_json(r.stdout)
    assert summary["status"] == "SUCCEEDED"
    assert summary["duplicate"] is False
    assert summary["entrypoint"] == f"python -m pipeline models list --registry {registry} --json"
    assert summary["address"] == head.address
    # the job ran this project's CLI on the cluster, and its logs were streamed to stderr
    expected = json.dumps({"models": [], "registry": str(registry)}, sort_keys=True)
    assert expected in r.stderr
    assert expected in head.client().get_job_logs(summary["submission_id"])


def test_failing_job_exits_1_with_its_last_log_lines(client_env, capsys):
    rc = cli.main(["submit", "--address", client_env.address, "--wait", "--", "train", "/nonexistent.yaml"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "FAILED" in err
    assert "last 20 log lines" in err
    # the job's own error line, quoted from its logs in the failure message
    tail = err.split("last 20 log lines", 1)[1]
    assert "config file not found: /nonexistent.yaml" in tail
    assert out.strip() == ""  # no summary on failure


def test_duplicate_submission_id_is_a_noop(client_env, capsys, tmp_path):
    client = client_env.client()
    sid = f"dup-{uuid.uuid4().hex[:8]}"
    cmd = ["--", "models", "list", "--registry", str(tmp_path)]
    rc = cli.main(["submit", "--address", client_env.address, "--submission-id", sid, *cmd])
    out, err = capsys.readouterr()
    assert rc == 0, err
    first = _last_json(out)
    assert first["duplicate"] is False and first["submission_id"] == sid
    assert first["status"] in {"PENDING", "RUNNING", "SUCCEEDED"}  # without --wait: returns at once
    n_jobs = len(client.list_jobs())

    rc = cli.main(["submit", "--address", client_env.address, "--wait", "--submission-id", sid, *cmd])
    out, err = capsys.readouterr()
    assert rc == 0, err
    second = _last_json(out)
    assert second["duplicate"] is True
    assert second["submission_id"] == sid
    assert second["status"] == "SUCCEEDED"  # --wait followed the existing job to its end
    assert "already exists" in err
    # a different command under the same id: still no second job; the summary names the real one
    rc = cli.main(["submit", "--address", client_env.address, "--submission-id", sid, "--", "models", "list"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    third = _last_json(out)
    assert third["duplicate"] is True and third["entrypoint"] == first["entrypoint"]
    assert "not 'python -m pipeline models list'" in err
    jobs = client.list_jobs()
    assert len(jobs) == n_jobs
    assert [j.submission_id for j in jobs].count(sid) == 1


def test_jobs_module_entrypoint_runs_on_the_cluster(client_env):
    """`ray job submit --working-dir . -- python -m jobs.train CONFIG` runs unchanged."""
    client = client_env.client()
    sid = client.submit_job(entrypoint="python -m jobs.train /nonexistent.yaml",
                            runtime_env=submit.runtime_env())
    deadline = time.monotonic() + 60
    while (status := str(client.get_job_status(sid))) not in TERMINAL:
        assert time.monotonic() < deadline, "job did not finish in 60 s"
        time.sleep(0.5)
    assert status == "FAILED"
    assert "config file not found: /nonexistent.yaml" in client.get_job_logs(sid)
    assert "exit code 2" in client.get_job_info(sid).message


def test_unreachable_address_exits_2_fast():
    port = _free_port()  # bound then closed: nothing listens there
    env = _client_env("unused")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", f"http://127.0.0.1:{port}",
                        "--wait", "--", "train", "x.yaml"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert elapsed < 15
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"imgpipe: error: cannot reach Ray job server at http://127.0.0.1:{port}"), r.stderr


def test_missing_token_exits_2(head, tmp_path):
    env = _client_env("")
    env.pop("RAY_AUTH_TOKEN")
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", head.address, "--",
                        "pack", "--help"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "requires a token" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ unit checks


def test_runtime_env_ships_the_project_without_data(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = submit.runtime_env()
    assert env["working_dir"] == str(ROOT)
    assert (Path(env["working_dir"]) / "pipeline" / "__init__.py").exists()
    for pattern in (".git", "runs", "imgpipe-demo", "*.parquet", "__pycache__", "benchmarks/results*"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "env_vars" not in submit.runtime_env(str(tmp_path))
    assert submit.runtime_env(str(tmp_path))["working_dir"] == str(tmp_path.resolve())


def test_installed_package_ships_no_working_dir(tmp_path):
    """A regular install (site-packages/pipeline) is no project: shipping site-packages
    would upload gigabytes; the cluster runs its installed imgpipe instead."""
    site = tmp_path / "lib" / "site-packages"
    (site / "pipeline").mkdir(parents=True)
    assert submit.project_root(site / "pipeline") is None
    (tmp_path / "src" / "pipeline").mkdir(parents=True)
    assert submit.project_root(tmp_path / "src" / "pipeline") is None  # no pyproject.toml
    (tmp_path / "src" / "pyproject.toml").write_text("[project]\nname = 'imgpipe'\n")
    assert submit.project_root(tmp_path / "src" / "pipeline") == tmp_path / "src"
    assert submit.project_root() == ROOT


def test_entrypoint_is_shell_quoted():
    cmd = submit.entrypoint(["train", "my cfg.yaml", "--set", "train.run_name=a b"])
    assert cmd == "python -m pipeline train 'my cfg.yaml' --set 'train.run_name=a b'"


@pytest.mark.parametrize("given,expected", [("head:8265", "http://head:8265"),
                                            ("http://head:8265/", "http://head:8265"),
                                            ("https://ray.example.com", "https://ray.example.com")])
def test_normalize_address(given, expected):
    assert submit.normalize_address(given) == expected


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="scheme"):
        submit.normalize_address("ray://head:10001")
    with pytest.raises(UserError, match="not a folder"):
        submit.runtime_env(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot submit 'submit'"):
        submit.run("http://127.0.0.1:1", ["submit", "--address", "x"])


class _FakeClient:
    """Scripted job server: each get_job_info call takes the next (status or exception)."""

    def __init__(self, script, logs="line 1\nline 2\n", message="Job failed."):
        self.script = list(script)
        self.logs = logs
        self.message = message
        self.log_calls = 0

    def get_job_info(self, sid):
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return type("Info", (), {"status": step, "message": self.message})()

    def get_job_logs(self, sid):
        self.log_calls += 1
        return self.logs


def test_follow_retries_blips_and_reports_failure(capsys):
    client = _FakeClient(["RUNNING", ConnectionError("blip"), "RUNNING", "FAILED"],
                         logs="".join(f"log {i}\n" for i in range(30)))
    with pytest.raises(JobFailed) as e:
        submit.follow(client, "sid", "http://h:8265", poll_s=0.01)
    text = str(e.value)
    assert text.startswith("job sid FAILED: Job failed.")
    assert "log 29" in text and "log 10" in text and "log 9\n" not in text  # the last 20 lines
    assert capsys.readouterr().err.count("log 0\n") == 1  # streamed once, not repeated


def test_follow_quiet_fetches_logs_only_at_the_end(capsys):
    client = _FakeClient(["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"])
    assert submit.follow(client, "sid", "http://h:8265", quiet=True, poll_s=0.01) == "SUCCEEDED"
    assert client.log_calls == 1
    assert capsys.readouterr().err == ""


def test_follow_reports_a_vanished_job():
    client = _FakeClient([RuntimeError("Request failed with status code 404: Job sid does not exist.")])
    with pytest.raises(JobFailed, match="no longer exists"):
        submit.follow(client, "sid", "http://h:8265", poll_s=0.01)


def test_log_interval_grows_with_the_log():
    assert submit.log_interval(0, 1.0) == 1.0
    assert submit.log_interval(2_000_000, 1.0) == 11.0
    assert submit.log_interval(100_000_000, 1.0) == 30.0


# ------------------------------------------------------- submission retries (unit)


def _ray_http_error(status: int, body: str) -> RuntimeError:
    """What Ray's JobSubmissionClient raises for an HTTP error answer."""
    return RuntimeError(f"Request failed with status code {status}: {body}.")


NO_AGENT = _ray_http_error(500, "No available agent to submit job, please try again later.")


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Server Error", response=response)


@pytest.mark.parametrize("error,status,transient,id_taken,not_found", [
    (NO_AGENT, 500, True, False, False),
    (_ray_http_error(503, "Service Unavailable"), 503, True, False, False),
    (_ray_http_error(429, "Too Many Requests"), 429, True, False, False),
    (_ray_http_error(400, "Traceback ... TypeError: bad runtime_env"), 400, False, False, False),
    (_ray_http_error(404, "Job sid does not exist"), 404, False, False, True),
    (_ray_http_error(500, "Traceback ... ValueError: Job with submission_id x already exists."),
     500, False, True, False),
    (_http_error(502), 502, True, False, False),
    (_http_error(401), 401, False, False, False),
    (requests.ConnectionError("Connection refused"), None, True, False, False),
    (requests.ReadTimeout("read timed out"), None, True, False, False),
    (ConnectionError("Failed to connect to Ray at address: http://h:8265."), None, True, False, False),
    (AuthenticationError("token refused"), None, False, False, False),
    (requests.exceptions.SSLError("certificate verify failed"), None, False, False, False),
    # status-like text elsewhere is not an HTTP status
    (RuntimeError("entrypoint 'python -m x --status-code 500' failed"), None, False, False, False),
    (RuntimeError("job 500: Request failed with status code 500: no"), None, False, False, False),
    (ValueError("bad runtime_env"), None, False, False, False),
])
def test_read_failure(error, status, transient, id_taken, not_found):
    f = submit.read_failure(error)
    assert (f.status, f.transient, f.id_taken, f.not_found) == (status, transient, id_taken, not_found)


class _StartingServer:
    """A job server whose agent is not up for the first ``refusals`` submissions; it
    keeps every accepted job. With ``lose_answer``, the first accepted submission's
    answer is lost on the way back (a dropped connection)."""

    def __init__(self, refusals: int, lose_answer: bool = False, refusal: Exception = NO_AGENT):
        self.refusals = refusals
        self.lose_answer = lose_answer
        self.refusal = refusal
        self.jobs: dict[str, str] = {}
        self.submit_calls: list[str] = []

    def submit_job(self, *, entrypoint, runtime_env=None, submission_id=None):
        self.submit_calls.append(submission_id)
        if self.refusals > 0:
            self.refusals -= 1
            raise self.refusal
        if submission_id in self.jobs:
            raise _ray_http_error(500, f"ValueError: Job with submission_id {submission_id} already exists.")
        self.jobs[submission_id] = entrypoint
        if self.lose_answer:
            self.lose_answer = False
            raise requests.ConnectionError("Connection aborted: RemoteDisconnected")
        return submission_id

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise _ray_http_error(404, f"Job {sid} does not exist")
        return type("Info", (), {"status": "PENDING", "entrypoint": self.jobs[sid], "message": ""})()


class _Clock:
    """Fake monotonic time that only sleeping advances."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s

    def __call__(self):
        return self.now


def _retry(window_s: float, clock: _Clock) -> submit.Retry:
    return submit.Retry(window_s, "http://h:8265", quiet=True, sleep=clock.sleep, clock=clock)


def test_submit_retries_no_available_agent_then_accepts_once():
    server, clock = _StartingServer(refusals=4), _Clock()
    assert submit.submit_once(server, "python -m pipeline x", {}, "sid-1", _retry(120, clock)) is True
    assert list(server.jobs) == ["sid-1"]  # exactly one accepted submission
    assert server.submit_calls == ["sid-1"] * 5  # one id for every attempt
    assert clock.sleeps == [1, 2, 4, 8]  # backoff doubles


def test_submit_whose_answer_was_lost_is_not_sent_again():
    server, clock = _StartingServer(refusals=1, lose_answer=True), _Clock()
    assert submit.submit_once(server, "python -m pipeline x", {}, "sid-2", _retry(120, clock)) is True
    assert list(server.jobs) == ["sid-2"]
    assert server.submit_calls == ["sid-2", "sid-2"]  # the lookup found it: no third attempt


def test_submit_gives_up_when_the_window_closes():
    server, clock = _StartingServer(refusals=10**6), _Clock()
    with pytest.raises(JobFailed) as e:
        submit.submit_once(server, "python -m pipeline x", {}, "sid-3", _retry(30, clock))
    assert "No available agent" in str(e.value) and "see --retry-s" in str(e.value)
    assert clock.now <= 30 and max(clock.sleeps) <= submit.BACKOFF_MAX_S
    assert server.jobs == {}


def test_submit_does_not_retry_what_cannot_succeed():
    bad = _ray_http_error(400, "TypeError: bad runtime_env")
    server, clock = _StartingServer(refusals=1, refusal=bad), _Clock()
    with pytest.raises(JobFailed, match=r"job submission to http://h:8265 failed: Request failed with status code 400"):
        submit.submit_once(server, "python -m pipeline x", {}, "sid-4", _retry(120, clock))
    assert clock.sleeps == [] and server.submit_calls == ["sid-4"]
    with pytest.raises(UserError, match="--retry-s"):
        submit.Retry(-1)


def test_another_submitter_holding_the_id_is_a_duplicate():
    server, clock = _StartingServer(refusals=0), _Clock()
    server.jobs["sid-5"] = "python -m pipeline other"
    assert submit.submit_once(server, "python -m pipeline x", {}, "sid-5", _retry(120, clock)) is False
    assert server.jobs == {"sid-5": "python -m pipeline other"}


def test_run_submits_under_an_id_made_here(monkeypatch):
    """Without --submission-id the id is made before the first attempt, so retries reuse it."""
    server = _StartingServer(refusals=2)
    monkeypatch.setattr(submit, "make_client", lambda address, retry=None: server)
    clock = _Clock()
    monkeypatch.setattr(submit, "Retry", functools.partial(submit.Retry, sleep=clock.sleep, clock=clock))
    summary = submit.run("http://h:8265", ["models", "list"], quiet=True)
    sid = summary["submission_id"]
    assert sid.startswith("raysubmit_") and len(sid) == len("raysubmit_") + 16
    assert server.submit_calls == [sid] * 3 and list(server.jobs) == [sid]
    assert summary["duplicate"] is False and summary["status"] == "PENDING"
    assert clock.sleeps == [1, 2]
