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

A head that is still starting answers "No available agent to submit job, please try
again" (HTTP 500) until its job agent is up. Until the job is accepted, such transient
failures (5xx, 408, 429, dropped connections, timeouts: :func:`read_failure`) are
retried with backoff for ``retry_s`` seconds (:class:`Retry`, ``--retry-s``). A retry
never submits twice: every submission carries an id (``--submission-id``, or one made
here), each retry first looks that id up (an attempt that failed on the way back may
have been accepted), and Ray's job server refuses a second job under one id anyway.
An address where nothing answers at all still fails at once (exit 2): a typo should
not wait two minutes.

Ctrl-C while waiting stops following, not the job: it keeps running on the cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shlex
import string
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from pipeline.errors import JobFailed, UserError
from pipeline.ops import runtime

PROBE_TIMEOUT_S = 5.0  # an unreachable job server fails the command within seconds
POLL_S = 1.0  # status and log polling interval while waiting
LOST_CONTACT_S = 120.0  # waiting gives up after the job server is unreachable this long
TAIL_LINES = 20  # log lines quoted when a job fails
RETRY_S = 120.0  # default --retry-s: how long transient failures before acceptance are retried
BACKOFF_S = 1.0  # first pause between attempts, doubling up to BACKOFF_MAX_S
BACKOFF_MAX_S = 10.0

EXCLUDES = [".git", ".venv", "venv", "runs", "imgpipe-demo", "*.parquet", ".device-kit",
            "__pycache__", "benchmarks/results*"]
PASS_ENV = ("AWS_ENDPOINT_URL",)  # forwarded to the job when set here; never credentials
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
T = TypeVar("T")


# ----------------------------------------------------------- failures and retries


@dataclasses.dataclass(frozen=True)
class Failure:
    """What a failed job API call means."""

    status: int | None  # HTTP status; None when no HTTP answer came
    transient: bool  # worth another attempt: the same call may succeed later
    id_taken: bool  # the server already holds a job under this submission id
    not_found: bool  # no such job


# Ray's JobSubmissionClient._raise_error (ray/dashboard/modules/dashboard_sdk.py, Ray 2.x)
_RAY_HTTP_ERROR = re.compile(r"Request failed with status code (\d{3}): (.*)", re.DOTALL)
_NO_ANSWER = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              ConnectionError, TimeoutError)  # refused, reset, dropped mid-answer, timed out


def read_failure(e: BaseException) -> Failure:
    """Classify ``e`` from a job API call. By type where there is one: no answer
    (:data:`_NO_ANSWER`) is transient, AuthenticationError and TLS errors never are,
    requests' HTTPError carries its status. Ray's client raises a bare RuntimeError
    ``"Request failed with status code NNN: <body>."`` for every other HTTP error, so
    its status and body are read from that text: here, and nowhere else. A 5xx, 408 or
    429 is transient ("No available agent to submit job" from a starting head is a 500),
    except the 500 that says the submission id already exists (the job agent's
    refusal of a second job under one id, passed on by the head)."""
    if isinstance(e, (AuthenticationError, requests.exceptions.SSLError)):  # retrying cannot fix them
        return Failure(None, transient=False, id_taken=False, not_found=False)
    if isinstance(e, requests.HTTPError) and e.response is not None:
        status, body = int(e.response.status_code), e.response.text or ""
    elif isinstance(e, _NO_ANSWER):
        return Failure(None, transient=True, id_taken=False, not_found=False)
    elif isinstance(e, RuntimeError) and (m := _RAY_HTTP_ERROR.match(str(e))):
        status, body = int(m.group(1)), m.group(2)
    else:
        return Failure(None, transient=False, id_taken=False, not_found=False)
    id_taken = "already exists" in body
    return Failure(status, transient=(status >= 500 or status in (408, 429)) and not id_taken,
                   id_taken=id_taken, not_found=status == 404)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclasses.dataclass
class Retry:
    """The retry window of one submission: transient failures (:func:`read_failure`) are
    retried after pauses of ``first_s``, doubling up to ``max_s``, until ``window_s``
    seconds after the window opened; then the last failure is raised."""

    window_s: float = RETRY_S
    address: str = ""
    quiet: bool = False
    first_s: float = BACKOFF_S
    max_s: float = BACKOFF_MAX_S
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    failures: int = 0  # transient failures so far
    opened: float = dataclasses.field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.window_s < 0:
            raise UserError(f"--retry-s must be >= 0 seconds, got {self.window_s:g}")
        self.opened = self.clock()

    def pause(self, e: BaseException) -> bool:
        """After transient failure ``e``: sleep before the next attempt (True), or False
        when the next attempt would start after the window closes."""
        delay = min(self.max_s, self.first_s * 2 ** self.failures)
        self.failures += 1
        if self.clock() + delay > self.opened + self.window_s:
            return False
        _say(f"imgpipe: Ray job server at {self.address} not ready ({_first_line(e)}); "
             f"retrying in {delay:g} s", self.quiet)
        self.sleep(delay)
        return True

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried while it fails transiently and the window is open."""
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - transient ones retried, the rest re-raised
                if not (read_failure(e).transient and self.pause(e)):
                    raise

    def gave_up(self) -> str:
        """Words for a failure message once retrying stopped: '' when nothing was retried."""
        if self.failures <= 1:
            return ""
        return f" (still failing after {self.failures} attempts in {self.window_s:g} s; see --retry-s)"


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


def make_client(address: str, retry: Retry | None = None) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for ``address`` (probed first, so this fails fast when
    nothing answers; transient failures after that are retried under ``retry``)."""
    address = normalize_address(address)
    headers = auth_headers(address, probe(address))
    _quiet_ray_logs()
    retry = retry or Retry(0.0, address)
    with _explicit_address():
        try:
            return retry.call(lambda: JobSubmissionClient(address, headers=headers))
        except AuthenticationError as e:
            first = str(e.message).strip().splitlines()[0] if e.message else "refused"
            raise UserError(f"Ray job server at {address} refused this client's token ({first}); "
                            "set RAY_AUTH_TOKEN to the cluster's token") from None
        except (ConnectionError, RuntimeError, requests.RequestException) as e:
            raise UserError(f"cannot reach Ray job server at {address}: {e}{retry.gave_up()}") from None


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
    env = {k: v for k, v in runtime.forwarded_env().items() if k in PASS_ENV}  # userinfo stripped
    if env:
        out["env_vars"] = env
    return out


def entrypoint(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "pipeline", *argv])


def new_submission_id() -> str:
    """A fresh id in Ray's own style (``raysubmit_`` + 16 letters and digits), made here
    rather than by the server so that a retried submission reuses it."""
    alphabet = string.ascii_letters + string.digits
    return "raysubmit_" + "".join(secrets.choice(alphabet) for _ in range(16))


def _existing_job(client: Any, submission_id: str, retry: Retry | None = None) -> Any | None:
    """The job info of ``submission_id``, or None when there is no such job (transient
    failures retried under ``retry``; none without it)."""
    retry = retry or Retry(0.0)
    try:
        return retry.call(lambda: client.get_job_info(submission_id))
    except Exception as e:  # noqa: BLE001 - classified: job server failures reported, the rest re-raised
        failure = read_failure(e)
        if failure.not_found:
            return None
        if failure.transient or isinstance(e, RuntimeError):
            raise JobFailed(f"cannot look up job {submission_id}: {e}{retry.gave_up()}") from None
        raise


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def submit_once(client: Any, cmd: str, env: dict[str, Any], submission_id: str, retry: Retry) -> bool:
    """Submit ``cmd`` under ``submission_id`` exactly once, retrying transient failures
    under ``retry``; True when the job under that id is this call's, False when another
    submitter already held the id. JobFailed when it cannot be submitted."""
    attempt = 0
    while True:
        attempt += 1
        try:
            client.submit_job(entrypoint=cmd, runtime_env=env or None, submission_id=submission_id)
            return True
        except Exception as e:  # noqa: BLE001 - classified: transient retried, the rest reported
            failure = read_failure(e)
            if failure.id_taken:  # after a retry: our own earlier attempt was accepted after all
                return attempt > 1
            if not failure.transient and not isinstance(e, RuntimeError):
                raise
            if not (failure.transient and retry.pause(e)):
                raise JobFailed(f"job submission to {retry.address} failed: {e}{retry.gave_up()}") from None
        with contextlib.suppress(JobFailed):  # unknown: submitting again is safe (the id is kept)
            if _existing_job(client, submission_id) is not None:
                return True  # an attempt that failed on the way back was accepted


def _submit_or_find(client: Any, cmd: str, env: dict[str, Any], submission_id: str | None,
                    retry: Retry, quiet: bool) -> tuple[str, Any | None, bool]:
    """(submission id, its job info, duplicate): the existing job under a given id, else
    a new submission."""
    existing = _existing_job(client, submission_id, retry) if submission_id else None
    if existing is not None:
        _say(f"imgpipe: job {submission_id} already exists ({str(existing.status)}); not submitting again", quiet)
        if existing.entrypoint and existing.entrypoint != cmd:
            _say(f"imgpipe: note: that job runs {existing.entrypoint!r}, not {cmd!r}", quiet)
        return submission_id, existing, True
    if "working_dir" not in env:
        _say("imgpipe: no source checkout here and no --working-dir: the job runs the imgpipe "
             "installed on the cluster", quiet)
    sid = submission_id or new_submission_id()
    if submit_once(client, cmd, env, sid, retry):
        _say(f"imgpipe: submitted job {sid} to {retry.address}: {cmd}", quiet)
        duplicate = False
    else:  # lost a race with another submitter using the same fixed id: same outcome
        _say(f"imgpipe: job {sid} already exists; not submitting again", quiet)
        duplicate = True
    return sid, _existing_job(client, sid, retry), duplicate


def run(address: str, argv: list[str], *, wait: bool = False, submission_id: str | None = None,
        working_dir: str | None = None, quiet: bool = False, retry_s: float = RETRY_S) -> dict[str, Any]:
    """Submit ``python -m pipeline ARGV...`` as a Ray job; with ``wait``, follow it to the end.

    Transient failures before the job is accepted are retried for ``retry_s`` seconds
    (see the module docstring). Returns the summary ``{"submission_id", "status",
    "address", "entrypoint", "duplicate"}``. Raises ``UserError`` (exit 2) for an
    unreachable address or bad arguments, ``JobFailed`` (exit 1) when submission fails
    or a followed job ends FAILED or STOPPED.
    """
    if not argv:
        raise UserError("submit needs a command after '--', e.g. imgpipe submit --address URL -- train cfg.yaml")
    if argv[0] == "submit":
        raise UserError("submit cannot submit 'submit'; give the command to run on the cluster, e.g. -- train cfg.yaml")
    address = normalize_address(address)
    env = runtime_env(working_dir)
    cmd = entrypoint(list(argv))
    retry = Retry(retry_s, address, quiet)
    client = make_client(address, retry)
    submission_id, existing, duplicate = _submit_or_find(client, cmd, env, submission_id, retry, quiet)

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
                if read_failure(e).not_found:
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
