"""Run maskdiet commands as Ray Jobs on a running cluster, through the Jobs REST API (`JobSubmissionClient`).

A job is any `maskdiet ...` command line. Its config travels with it: a local YAML file is shipped in the
job's `runtime_env` working dir (Ray uploads it with the submission, so the cluster needs no shared disk)
and passed as `--config maskdiet-config.yaml`; a config already at an object-store URL is passed as is.
Run-producing commands are named after the submission id, unless the command names its run itself: `run`
and `curate` get `--set run_id=<submission_id>`, `pretrain` gets `--run-name <submission_id>` (its checkpoint
folder), and a new `sweep` gets `--name <submission_id>`. So the run of a job is known from its submission id
alone, two pretrain jobs writing to one output do not share (and resume) one checkpoint folder, and a
retried submission with the same id is refused by Ray instead of running twice.

Authentication: Ray 2.60 clusters use token auth. A client must send `Authorization: Bearer <token>`; Ray's
own client only does so when `RAY_AUTH_MODE=token` is set in the client's environment. We look for a token
the way Ray does (`RAY_AUTH_TOKEN`, then the file at `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`) and send
it whenever one is found, whatever `RAY_AUTH_MODE` says (unless it says `disabled`). The token is never
logged or printed; error messages are scrubbed of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import override_key
from pipeline.core.errors import MaskdietError, UserInputError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard (Jobs API) of a local `ray start --head`
CONFIG_NAME = "maskdiet-config.yaml"  # the config's name inside the job's working dir
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
ACTIVE_STATES = frozenset({"PENDING", "RUNNING"})
# Commands that create a run, and how a job names the run after its submission id (see `name_the_run`).
RUN_COMMANDS = frozenset({"run", "curate", "pretrain", "sweep"})
# Lines our commands print that locate their outputs ("manifest: s3://...", "run dir: ...").
_OUTPUT_LINE = re.compile(
    r"^\s*(run directory|run dir|manifest|quarantine|report|encoder)\s*:\s*(\S+)\s*$", re.MULTILINE
)
_SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobsError(MaskdietError, RuntimeError):
    """The cluster could not be used (unreachable, auth, unknown job); the message says what to set or do."""


# ---------------------------------------------------------------------------------------------- auth


# Set by Ray's job supervisor for a job's entrypoint: JSON with the job's runtime_env and metadata.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def current_submission_id(env: Mapping[str, str] | None = None) -> str | None:
    """The submission id of the Ray job this process is the entrypoint of, or None outside a job."""
    env = os.environ if env is None else env
    try:
        return str(json.loads(env[JOB_CONFIG_ENV])["metadata"]["job_submission_id"]) or None
    except (KeyError, TypeError, ValueError):
        return None


def find_token(env: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """The cluster token, looked up in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Returns None when auth is explicitly disabled (`RAY_AUTH_MODE=disabled`) or no token is found.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    candidates = []
    if env.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser())
    candidates.append((home or Path.home()) / ".ray" / "auth_token")
    for path in candidates:
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
    return None


AUTH_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token (or put it in ~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH "
    "at a file holding it). On the head node `ray get-auth-token` prints it; on KubeRay it is the `auth_token` "
    "key of the cluster's token Secret (see infra/README.md)"
)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def resolve_address(address: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The Jobs API URL: `address`, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else local.

    A bare `host:port` gets `http://`. A `ray://` or GCS address is not the Jobs API: say which port to use.
    """
    env = os.environ if env is None else env
    chosen = address or env.get("RAY_API_SERVER_ADDRESS")
    if not chosen:
        ray_address = env.get("RAY_ADDRESS", "")
        chosen = ray_address if ray_address.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if chosen.startswith("ray://"):
        raise JobsError(
            f"{chosen} is a Ray Client address; jobs go to the dashboard: --address http://HEAD:8265"
        )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    return chosen.rstrip("/")


def connect(address: str | None = None, env: Mapping[str, str] | None = None) -> Any:
    """A `JobSubmissionClient` for the cluster, sending the token when one is found.

    Raises `JobsError` naming the fix when the cluster is unreachable or refuses our credentials.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address, env)
    token = find_token(env)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # ConnectionError, ray AuthenticationError, RuntimeError from the HTTP layer
        raise _translate(e, url, token) from None


def _translate(err: BaseException, url: str, token: str | None) -> JobsError:
    text = _redact(str(err), token)
    low = text.lower()
    if "missing authentication token" in low or "authentication required" in low or " 401" in low:
        disabled = os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"
        why = "RAY_AUTH_MODE=disabled is set here (unset it)" if disabled else "none was found"
        return JobsError(f"the Ray cluster at {url} requires a token and {why}: {AUTH_HELP}")
    if "invalid authentication token" in low or "forbidden" in low or " 403" in low:
        return JobsError(f"the Ray cluster at {url} rejected our token: {AUTH_HELP}")
    if "does not exist" in low or " 404" in low:
        return JobsError(f"no such job at {url}: {text.splitlines()[-1] if text else ''}")
    if isinstance(err, ConnectionError) or "connect" in low:
        return JobsError(
            f"cannot reach the Ray Jobs API at {url}: is the cluster up? Pass --address http://HEAD:8265 "
            f"or set RAY_API_SERVER_ADDRESS ({type(err).__name__})"
        )
    return JobsError(f"Ray Jobs API at {url}: {type(err).__name__}: {text}")


def _client_token(client: Any) -> str | None:
    """The token this client sends (to scrub it from error text), read back from its headers."""
    header = (getattr(client, "_headers", None) or {}).get("Authorization", "")
    return header.removeprefix("Bearer ") or None


def _call(client: Any, fn: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return getattr(client, fn)(*args, **kwargs)
    except Exception as e:
        raise _translate(e, getattr(client, "_address", "?"), _client_token(client)) from None


# ---------------------------------------------------------------------------------------------- submit


@dataclass
class Submission:
    """What goes to `submit_job`: the final entrypoint, runtime_env and metadata."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    staged_dir: str | None = None  # temporary working dir holding the config; removed after submitting


def new_submission_id(prefix: str = "maskdiet") -> str:
    """A fresh, readable id: `<prefix>-<UTC time>-<6 hex>`."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _option_value(tokens: Sequence[str], *names: str) -> str | None:
    for i, tok in enumerate(tokens):
        for name in names:
            if tok == name and i + 1 < len(tokens):
                return tokens[i + 1]
            if name.startswith("--") and tok.startswith(name + "="):
                return tok.split("=", 1)[1]
    return None


# Options of `run` and `sweep` that take no value; every other option is followed by its value.
_FLAGS = ("--verbose", "-v", "--resume", "--help")


def config_named_in(tokens: Sequence[str]) -> str | None:
    """The config a maskdiet command line names itself: `--config`, or `run`/`sweep`'s CONFIG argument."""
    if len(tokens) < 2 or Path(tokens[0]).name != "maskdiet":
        return None
    option = _option_value(tokens, "--config", "-c")
    if option is not None or tokens[1] not in ("run", "sweep"):
        return option
    rest = list(tokens[2:])
    while rest:
        tok = rest.pop(0)
        if not tok.startswith("-"):
            return tok
        if "=" not in tok and tok not in _FLAGS and rest:
            rest.pop(0)  # the option's value
    return None


def names_a_config(tokens: Sequence[str]) -> bool:
    """Whether a maskdiet command line names its own config (see `config_named_in`)."""
    return config_named_in(tokens) is not None


def set_values(tokens: Sequence[str]) -> dict[str, str]:
    """A command line's `--set key=value` options (`--set X`, `-s X` or `--set=X`) by key; the last wins."""
    values = {}
    for i, tok in enumerate(tokens):
        if tok in ("--set", "-s") and i + 1 < len(tokens):
            assignment = tokens[i + 1]
        elif tok.startswith("--set="):
            assignment = tok.removeprefix("--set=")
        else:
            continue
        values[override_key(assignment)] = assignment.partition("=")[2].strip()
    return values


def name_the_run(subcommand: str, tokens: Sequence[str], name: str, config: str | None = None) -> list[str]:
    """The options that name a `subcommand` job's run `name`, or none where the run is named already:
    `run`/`curate` → `--set run_id`, `pretrain` → `--run-name`, a new `sweep` → `--name`. A sweep is left
    as it is on `--resume` (a name picks the sweep to continue), and when its `config` file sets
    `tune.name` or cannot be read here to tell (a flag would win over the file's name)."""
    if subcommand in ("run", "curate"):
        return [] if "run_id" in set_values(tokens) else ["--set", f"run_id={name}"]
    if subcommand == "pretrain":
        return [] if _option_value(tokens, "--run-name") is not None else ["--run-name", name]
    if subcommand == "sweep":
        named = _option_value(tokens, "--name") is not None or "tune.name" in set_values(tokens)
        if (
            named
            or "--resume" in tokens
            or (config is not None and _config_value(config, "tune", "name") != "")
        ):
            return []
        return ["--name", name]
    return []


def _config_value(config: str, *keys: str) -> str | None:
    """A config file's value at `keys` ("" when it sets none), or None when the file cannot be read here."""
    try:
        from pipeline.core.config import read_yaml

        value: Any = read_yaml(config)
    except Exception:  # a config we cannot read from here: the caller decides what not knowing means
        return None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return str(value) if value else ""


def _config_output(config: str) -> str | None:
    """The `output` key of a config file, if it is readable here (used only for job metadata)."""
    return _config_value(config, "output") or None


def prepare_submission(
    command: str | Sequence[str],
    *,
    config: str | None = None,
    submission_id: str | None = None,
    pip: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Submission:
    """Turn a maskdiet command line plus a config into a submission (no network).

    `command`: e.g. `["maskdiet", "curate", "--input", "s3://b/train"]` or the same as one string.
    `config`: a local YAML path (shipped in the working dir) or an fsspec URL (passed as is).
    """
    tokens = shlex.split(command) if isinstance(command, str) else list(command)
    if not tokens:
        raise UserInputError("no command to submit: give one after `--`, e.g. -- maskdiet curate --input URL")
    sid = submission_id or new_submission_id()
    if not _SUBMISSION_ID.match(sid):
        raise UserInputError(f"bad submission id {sid!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    is_maskdiet = Path(tokens[0]).name == "maskdiet"
    subcommand = tokens[1] if is_maskdiet and len(tokens) > 1 else ""
    runtime_env: dict[str, Any] = {}
    staged: str | None = None
    if config is not None:
        if not is_maskdiet:
            raise UserInputError(
                f"--config is passed to maskdiet commands only; the command is {tokens[0]!r}"
            )
        if names_a_config(tokens):
            raise UserInputError(
                "give the config either to `jobs submit --config` or to the command, not both"
            )
        if "://" in config:
            ref = config
        else:
            if not Path(config).is_file():
                raise UserInputError(f"config file not found: {config}")
            staged = tempfile.mkdtemp(prefix="maskdiet-job-")
            shutil.copyfile(config, os.path.join(staged, CONFIG_NAME))
            runtime_env["working_dir"] = staged
            ref = CONFIG_NAME
        tokens += ["--config", ref]
    if subcommand in RUN_COMMANDS:
        tokens += name_the_run(subcommand, tokens, sid, config or config_named_in(tokens))
    if pip:
        runtime_env["pip"] = list(pip)
    # Job logs are read by programs too (`jobs status` finds "manifest: URL" lines): keep rich from
    # wrapping long URLs at 80 columns.
    runtime_env["env_vars"] = {"COLUMNS": "400", **(env_vars or {})}
    # The run id a `run` job's folder is named after: the command's own, if it gave one.
    meta = {
        "maskdiet": "1",
        "command": subcommand or tokens[0],
        "run_id": set_values(tokens).get("run_id", sid),
    }
    output = _option_value(tokens, "--output", "-o") or (
        _config_output(config) if config and "://" not in config else None
    )
    if output:
        meta["output"] = output
    meta.update(metadata or {})
    return Submission(sid, shlex.join(tokens), runtime_env, meta, staged)


def submit(
    client: Any,
    command: str | Sequence[str],
    *,
    config: str | None = None,
    submission_id: str | None = None,
    pip: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    retry_s: float = 60.0,
) -> str:
    """Submit a maskdiet command as a Ray job; returns its submission id.

    A submission id that already exists on the cluster is refused (raises `JobsError`): that is what makes a
    scheduled submission idempotent. "No available agent" (a head still starting) is retried for `retry_s`.
    """
    sub = prepare_submission(
        command, config=config, submission_id=submission_id, pip=pip, env_vars=env_vars, metadata=metadata
    )
    try:
        log.info("submitting %s as %s", sub.entrypoint, sub.submission_id)
        deadline = time.monotonic() + retry_s
        while True:
            try:
                return _call(
                    client,
                    "submit_job",
                    entrypoint=sub.entrypoint,
                    submission_id=sub.submission_id,
                    runtime_env=sub.runtime_env or None,
                    metadata=sub.metadata,
                )
            except JobsError as e:
                # A head that has just started answers 500 until its job agent is up.
                if "try again later" not in str(e) or time.monotonic() > deadline:
                    raise
                log.info("the cluster's job agent is not ready; retrying")
                time.sleep(2.0)
    finally:
        if sub.staged_dir:
            shutil.rmtree(sub.staged_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- inspect


@dataclass
class JobState:
    """A job as the cluster reports it, plus where its outputs are when known."""

    submission_id: str
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    entrypoint: str = ""
    message: str = ""
    start_time: float | None = None  # seconds since the epoch
    end_time: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # from the logs: manifest, run dir, ...

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATES

    @property
    def run_dir(self) -> str | None:
        """Where this job's run lives: what its command printed, else `<output>/runs/<run_id>` for `run`."""
        printed = self.outputs.get("run directory") or self.outputs.get("run dir")
        if printed:
            return printed
        meta = self.metadata
        if meta.get("command") == "run" and meta.get("output") and meta.get("run_id"):
            from pipeline.core.storage import join

            return join(meta["output"], "runs", meta["run_id"])
        return None


def _state(info: Any) -> JobState:
    def seconds(ms: Any) -> float | None:
        return ms / 1000.0 if ms else None

    return JobState(
        submission_id=info.submission_id or info.job_id or "",
        status=str(getattr(info.status, "value", info.status)),
        entrypoint=info.entrypoint or "",
        message=info.message or "",
        start_time=seconds(info.start_time),
        end_time=seconds(info.end_time),
        metadata=dict(info.metadata or {}),
    )


def find_outputs(logs: str) -> dict[str, str]:
    """Output locations printed by maskdiet commands (`manifest: URL`, `run dir: URL`); last one wins."""
    return {m.group(1): m.group(2) for m in _OUTPUT_LINE.finditer(logs)}


def job_status(client: Any, submission_id: str, with_outputs: bool = True) -> JobState:
    """The job's state; with `with_outputs`, also the output locations found in its logs."""
    state = _state(_call(client, "get_job_info", submission_id))
    if with_outputs:
        state.outputs = find_outputs(job_logs(client, submission_id))
    return state


def job_exists(client: Any, submission_id: str) -> bool:
    try:
        client.get_job_info(submission_id)
    except Exception as e:
        if "does not exist" in str(e) or "404" in str(e):
            return False
        raise _translate(e, getattr(client, "_address", "?"), _client_token(client)) from None
    return True


def list_jobs(client: Any) -> list[JobState]:
    """All jobs on the cluster, oldest first."""
    states = [_state(info) for info in _call(client, "list_jobs")]
    return sorted(states, key=lambda s: s.start_time or 0.0)


def job_logs(client: Any, submission_id: str) -> str:
    return _call(client, "get_job_logs", submission_id)


def follow_logs(client: Any, submission_id: str) -> Iterator[str]:
    """Stream the job's log as it is written, until the job ends (Ray's websocket tail, driven here)."""
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(submission_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            except Exception as e:
                raise _translate(e, getattr(client, "_address", "?"), _client_token(client)) from None
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def wait_for(client: Any, submission_id: str, timeout: float = 600.0, poll: float = 1.0) -> str:
    """Poll until the job reaches a terminal state; returns it. Raises `TimeoutError` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(_call(client, "get_job_status", submission_id).value)
        if status in TERMINAL_STATES:
            return status
        if time.monotonic() > deadline:
            raise JobsError(f"job {submission_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def stop(client: Any, submission_id: str, wait: float = 30.0) -> str:
    """Ask the cluster to stop the job; wait up to `wait` s for it to end. Returns the last state seen."""
    _call(client, "stop_job", submission_id)
    try:
        return wait_for(client, submission_id, timeout=wait, poll=0.5)
    except TimeoutError:
        return str(_call(client, "get_job_status", submission_id).value)
