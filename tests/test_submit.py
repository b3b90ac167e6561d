"""``imgpipe submit`` against a real Ray head started by ``ray start --head``.

The head runs in its own temp dir with its own ports and its own token (token
authentication is Ray's default for new clusters), and is stopped by process id:
``ray stop`` would stop every Ray instance on the machine, other tests' included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def head():
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
        while True:  # the job API is up when an authenticated job listing answers
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


def test_successful_job_subprocess(head, tmp_path):
    registry = tmp_path / "registry"
    env = _client_env(head.token)
    env["RAY_ADDRESS"] = "http://127.0.0.1:1"  # an explicit --address wins over the environment
    r = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", head.address, "--wait",
                        "--", "models", "list", "--registry", str(registry)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = _last_json(r.stdout)
    assert summary["status"] == "SUCCEEDED"
    assert summary["duplicate"] is False
    assert summary["entrypoint"] == f"python -m pipeline models list --registry {registry}"
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
