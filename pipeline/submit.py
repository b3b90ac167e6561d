"""``imgpipe submit``: run any imgpipe command as a Ray job on a cluster.

Owns the client side of Ray's job API: reaching the job server (failing fast when it
is unreachable), shipping this project as the job's ``working_dir``, the entrypoint
``python -m pipeline <argv...>``, idempotent submission under a fixed
``--submission-id`` (a second submission with the same id reports the existing job
instead of starting another one: a retried nightly CronJob pod is a no-op), and
``--wait``: following the job's logs until it ends and turning its outcome into the
exit code (0 SUCCEEDED; 1 FAILED or STOPPED, with the job's last log lines). Clusters
with token authentication get the local token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), as ``ray job`` sends it.

Ctrl-C while waiting stops following, not the job: it keeps running on the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from pipeline.errors import JobFailed, UserError

PROBE_TIMEOUT_S = 5.0  # an unreachable job server fails the command within seconds
POLL_S = 1.0  # status and log polling interval while waiting
LOST_CONTACT_S = 120.0  # waiting gives up after the job server is unreachable this long
TAIL_LINES = 20  # log lines quoted when a job fails

EXCLUDES = [".git", ".venv", "venv", "runs", "imgpipe-demo", "*.parquet", ".device-kit",
            "__pycache__", "benchmarks/results*"]
PASS_ENV = ("AWS_ENDPOINT_URL",)  # forwarded to the job when set here; never credentials
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root(package_dir: Path | None = None) -> Path | None:
    """The source checkout holding the ``pipeline`` package (what is shipped to the
    cluster), or None when imgpipe is installed as a package (site-packages is no
    project: the cluster's image is expected to have imgpipe installed, as in
    cluster/kuberay)."""
    parent = (package_dir or Path(__file__).resolve().parent).parent
    if (parent / "pyproject.toml").is_file() and parent.name not in ("site-packages", "dist-packages"):
        return parent
    return None


def normalize_address(address: str) -> str:
    """``head:8265`` -> ``http://head:8265``; only http(s) job server URLs are accepted."""
    address = (address or "").strip().rstrip("/")
    if not address:
        raise UserError("submit needs --address, the Ray dashboard URL, e.g. http://head:8265")
    if "://" not in address:
        address = "http://" + address
    scheme = urllib.parse.urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise UserError(f"--address {address}: expected the Ray dashboard URL "
                        f"(http://HOST:8265 or https://...), got scheme {scheme}://")
    return address


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> int:
    """Fail fast (UserError, exit 2) when nothing answers at ``address``; else the HTTP status.

    Any HTTP answer counts as reachable (401: the cluster wants a token, see
    :func:`auth_headers`); only connection errors and timeouts are refused here.
    """
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=timeout) as r:
            r.read(4096)
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot reach Ray job server at {address}: {reason}") from None


def auth_token() -> str | None:
    """The local Ray token, where Ray itself looks: $RAY_AUTH_TOKEN, the file at
    $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.expanduser().read_text().strip() or None
    except OSError:
        return None


def auth_headers(address: str, probe_status: int) -> dict[str, str] | None:
    """Clusters with token authentication (Ray's default for new local clusters) answer
    401 without a token; send the local one, as ``ray job`` does with RAY_AUTH_MODE=token."""
    if probe_status != 401:
        return None
    token = auth_token()
    if not token:
        raise UserError(f"Ray job server at {address} requires a token: set RAY_AUTH_TOKEN, or "
                        "put the cluster's token in ~/.ray/auth_token (see `ray get-auth-token`)")
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the client's address;
    an explicit --address must win, so hide them while the client is built."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_client(address: str) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for ``address`` (probed first, so this fails fast)."""
    address = normalize_address(address)
    headers = auth_headers(address, probe(address))
    _quiet_ray_logs()
    with _explicit_address():
        try:
            return JobSubmissionClient(address, headers=headers)
        except AuthenticationError as e:
            first = str(e.message).strip().splitlines()[0] if e.message else "refused"
            raise UserError(f"Ray job server at {address} refused this client's token ({first}); "
                            "set RAY_AUTH_TOKEN to the cluster's token") from None
        except (ConnectionError, RuntimeError) as e:
            raise UserError(f"cannot reach Ray job server at {address}: {e}") from None


class _DropExcludeNotice(logging.Filter):
    """Drops Ray's warning that a default-excluded folder (.git, .venv...) is not shipped:
    :data:`EXCLUDES` leaves those out on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in record.getMessage()


def _quiet_ray_logs() -> None:
    """Ray's INFO lines about packaging the working_dir are noise here; our own stderr
    lines say what happens. Its other warnings and errors stay."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    # The notice comes from a logger inside Ray's private packages; every Ray logger ends
    # in the "ray" logger's handlers (it does not propagate further), so filter there.
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _DropExcludeNotice) for f in handler.filters):
            handler.addFilter(_DropExcludeNotice())


def runtime_env(working_dir: str | None = None) -> dict[str, Any]:
    """The job's runtime_env: this project as working_dir (minus data and caches), and
    AWS_ENDPOINT_URL when set here. Without a source checkout and without
    ``working_dir``, nothing is shipped: the cluster runs its installed imgpipe."""
    if working_dir:
        root: Path | None = Path(working_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--working-dir {working_dir}: not a folder")
    else:
        root = project_root()
    out: dict[str, Any] = {}
    if root is not None:
        out = {"working_dir": str(root.resolve()), "excludes": list(EXCLUDES)}
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    if env:
        out["env_vars"] = env
    return out


def entrypoint(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "pipeline", *argv])


def _is_not_found(e: Exception) -> bool:
    text = str(e)
    return "404" in text or "does not exist" in text or "not found" in text.lower()


def _existing_job(client: Any, submission_id: str) -> Any | None:
    """The job info of ``submission_id``, or None when there is no such job."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as e:
        if _is_not_found(e):
            return None
        raise JobFailed(f"cannot look up job {submission_id}: {e}") from None


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run(address: str, argv: list[str], *, wait: bool = False, submission_id: str | None = None,
        working_dir: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Submit ``python -m pipeline ARGV...`` as a Ray job; with ``wait``, follow it to the end.

    Returns the summary ``{"submission_id", "status", "address", "entrypoint",
    "duplicate"}``. Raises ``UserError`` (exit 2) for an unreachable address or bad
    arguments, ``JobFailed`` (exit 1) when a followed job ends FAILED or STOPPED.
    """
    if not argv:
        raise UserError("submit needs a command after '--', e.g. imgpipe submit --address URL -- train cfg.yaml")
    if argv[0] == "submit":
        raise UserError("submit cannot submit 'submit'; give the command to run on the cluster, e.g. -- train cfg.yaml")
    address = normalize_address(address)
    env = runtime_env(working_dir)
    cmd = entrypoint(list(argv))
    client = make_client(address)

    duplicate = False
    existing = _existing_job(client, submission_id) if submission_id else None
    if existing is not None:
        duplicate = True
        _say(f"imgpipe: job {submission_id} already exists ({str(existing.status)}); not submitting again", quiet)
        if existing.entrypoint and existing.entrypoint != cmd:
            _say(f"imgpipe: note: that job runs {existing.entrypoint!r}, not {cmd!r}", quiet)
    else:
        if "working_dir" not in env:
            _say("imgpipe: no source checkout here and no --working-dir: the job runs the imgpipe "
                 "installed on the cluster", quiet)
        try:
            submission_id = client.submit_job(entrypoint=cmd, runtime_env=env or None,
                                              submission_id=submission_id)
        except RuntimeError as e:
            # Lost a race with another submitter using the same fixed id: same outcome.
            if submission_id and "already exists" in str(e):
                duplicate = True
                _say(f"imgpipe: job {submission_id} already exists; not submitting again", quiet)
            else:
                raise JobFailed(f"job submission to {address} failed: {e}") from None
        else:
            _say(f"imgpipe: submitted job {submission_id} to {address}: {cmd}", quiet)
        existing = _existing_job(client, submission_id)

    summary = {"submission_id": submission_id,
               "status": str(existing.status) if existing is not None else "PENDING",
               "address": address,
               "entrypoint": (existing.entrypoint if existing is not None else None) or cmd,
               "duplicate": duplicate}
    if not wait:
        if not duplicate:
            _say(f"imgpipe: follow it with: ray job logs --address {address} --follow {submission_id}", quiet)
        return summary
    summary["status"] = follow(client, submission_id, address, quiet=quiet)
    return summary


def log_interval(log_chars: int, poll_s: float) -> float:
    """Ray returns the whole log on each call: fetch big logs less often (1 s per
    200 kB, at most every 30 s), so that following a long run stays cheap."""
    return min(30.0, poll_s + log_chars / 200_000)


def follow(client: Any, submission_id: str, address: str, *, quiet: bool = False,
           poll_s: float = POLL_S) -> str:
    """Print the job's new log text to stderr until it ends; SUCCEEDED or JobFailed."""
    printed = 0
    logs = ""
    last_contact = time.monotonic()
    last_logs = float("-inf")
    try:
        while True:
            try:
                info = client.get_job_info(submission_id)
                status = str(info.status)
                done = status in TERMINAL
                now = time.monotonic()
                if done or (not quiet and now - last_logs >= log_interval(len(logs), poll_s)):
                    logs = client.get_job_logs(submission_id) or ""
                    last_logs = now
                last_contact = now
            except Exception as e:  # noqa: BLE001 - a head restart or a network blip: retry
                if isinstance(e, RuntimeError) and _is_not_found(e):
                    raise JobFailed(f"job {submission_id} no longer exists on {address} "
                                    f"(deleted, or the cluster was replaced)") from None
                if time.monotonic() - last_contact > LOST_CONTACT_S:
                    raise JobFailed(f"lost contact with the Ray job server at {address} while "
                                    f"waiting for job {submission_id}: {e}") from None
                time.sleep(poll_s)
                continue
            if len(logs) < printed:  # logs rotated or replaced: start over
                printed = 0
            if not quiet and len(logs) > printed:
                sys.stderr.write(logs[printed:])
                sys.stderr.flush()
            printed = len(logs)
            if done:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"imgpipe: stopped following; job {submission_id} keeps running. "
              f"Stop it with: ray job stop --address {address} {submission_id}", file=sys.stderr)
        raise
    if status == "SUCCEEDED":
        return status
    tail = "\n".join(logs.rstrip("\n").splitlines()[-TAIL_LINES:])
    message = (getattr(info, "message", None) or "").strip()
    # Ray's message for a failed entrypoint already quotes the logs; keep its first line.
    message = message.splitlines()[0] if message else "no message"
    raise JobFailed(f"job {submission_id} {status}: {message}\n"
                    f"--- last {TAIL_LINES} log lines of {submission_id} ---\n{tail}")
