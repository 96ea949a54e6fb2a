"""Run maskdiet commands as Ray Jobs on a running cluster, through the Jobs REST API (`JobSubmissionClient`).

A job is any `maskdiet ...` command line. Its config travels with it: a local YAML file is shipped in the
job's `runtime_env` working dir (Ray uploads it with the submission, so the cluster needs no shared disk)
and passed as `--config maskdiet-config.yaml`; a config already at an object-store URL is passed as is.
Run-producing commands are named after the submission id, unless the command names its run itself: `run`
and `curate` get `--set run_id=<submission_id>`, `pretrain` gets `--run-name <submission_id>` (its checkpoint
folder), and a new `sweep` gets `--name <submission_id>`. So the run of a job is known from its submission id
alone, two pretrain jobs writing to one output do not share (and resume) one checkpoint folder, and a
retried submission with the same id is refused by Ray instead of running twice.

Outputs: each run-producing command writes a `result.json` (`pipeline.core.results`) beside what it
produced. `job_outputs` finds that file from the job alone (its entrypoint, plus what the submission recorded
from a shipped config: output URL and run id) and reads the outputs from it; the lines the command prints
are for people. When the location cannot be known from here (a relative output, a run id chosen only when the
run starts) it says so rather than guess.

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
from pipeline.core.results import read_result, result_url
from pipeline.core.runs import run_dir_for
from pipeline.core.storage import join

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard (Jobs API) of a local `ray start --head`
CONFIG_NAME = "maskdiet-config.yaml"  # the config's name inside the job's working dir
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Commands that create a run, and how a job names the run after its submission id (see `name_the_run`).
RUN_COMMANDS = frozenset({"run", "curate", "pretrain", "sweep"})
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


@dataclass(frozen=True)
class RunSettings:
    """Where a run command writes, as far as its command line and config tell here (None: not known)."""

    output: str | None = None  # `output`
    tune_output: str | None = None  # `tune.output` (a sweep's root; default <output>/sweeps)
    run_id: str | None = None  # run/curate: run_id; pretrain: its run name; sweep: its name


def run_settings(
    subcommand: str, tokens: Sequence[str], submission_id: str, config: str | None = None
) -> RunSettings:
    """A run command line's output, sweep root and run id, in the order the command resolves them
    (`--set` over its flag over the `config` file, read when given and readable here)."""
    sets = set_values(tokens)

    def from_config(*keys: str) -> str | None:
        return (_config_value(config, *keys) or None) if config else None

    output = sets.get("output") or _option_value(tokens, "--output", "-o") or from_config("output")
    run_id: str | None = None
    if subcommand in ("run", "curate"):
        run_id = sets.get("run_id") or from_config("run_id")
    elif subcommand == "pretrain":  # inside a job, pretrain's default run name is the submission id
        run_id = _option_value(tokens, "--run-name") or submission_id
    elif subcommand == "sweep":  # no name: a new sweep is named by the clock; --resume takes the latest
        run_id = sets.get("tune.name") or _option_value(tokens, "--name") or from_config("tune", "name")
    return RunSettings(
        output=output,
        tune_output=sets.get("tune.output") or from_config("tune", "output"),
        run_id=run_id,
    )


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
    # People read job logs and copy the output URLs the command prints: keep rich from wrapping them at 80
    # columns (a job's driver has no terminal). Programs read result.json instead (`job_outputs`).
    runtime_env["env_vars"] = {"COLUMNS": "400", **(env_vars or {})}
    meta = {
        "maskdiet": "1",
        "command": subcommand or tokens[0],
        **_run_metadata(subcommand, tokens, sid, config),
    }
    meta.update(metadata or {})
    return Submission(sid, shlex.join(tokens), runtime_env, meta, staged)


def _run_metadata(subcommand: str, tokens: Sequence[str], sid: str, config: str | None) -> dict[str, str]:
    """What `job_outputs` needs later and cannot read then: the run's settings from the shipped config file
    (only the job's working dir holds it). A config URL is not read here (no network at submission):
    `job_outputs` reads it when asked."""
    if subcommand not in RUN_COMMANDS:
        return {"run_id": sid}
    local = config if config and "://" not in config else None
    settings = run_settings(subcommand, tokens, sid, local)
    meta = {"output": settings.output, "tune_output": settings.tune_output, "run_id": settings.run_id}
    return {key: value for key, value in meta.items() if value}


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
    # From the run's result.json (`job_outputs`): manifest, run_dir, encoder, ...
    outputs: dict[str, str] = field(default_factory=dict)
    result_url: str | None = None  # the result.json the outputs were (or will be) read from
    outputs_note: str = ""  # why `outputs` is empty when the job makes a run: not known here, not written yet

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATES

    @property
    def run_dir(self) -> str | None:
        """Where this job's run lives: what its result.json says, else `<output>/runs/<run_id>` for `run`
        (known from the submission before the run has written anything)."""
        if self.outputs.get("run_dir"):
            return self.outputs["run_dir"]
        meta = self.metadata
        if meta.get("command") == "run" and meta.get("output") and meta.get("run_id"):
            return run_dir_for(meta["output"], meta["run_id"])
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


@dataclass(frozen=True)
class ResultLocation:
    """Where a job's run writes its result.json (`pipeline.core.results`), or why that is not known here."""

    dir_url: str | None  # the folder holding result.json; None when unknown
    run_id: str | None  # the run the file must name: several runs may share one output folder
    unknown: str = ""  # why dir_url is None


class _Unknown(Exception):
    """A job's result location cannot be known from here; the message says why."""


def _known_folder(url: str | None, what: str) -> str:
    """`url` when a reader here can find it; else `_Unknown` saying why not (never a guess)."""
    if not url:
        raise _Unknown(
            f"the job's {what} is not known here (not on its command line or in a config read here)"
        )
    if "://" not in url and not os.path.isabs(url):
        raise _Unknown(f"the job's {what} {url!r} is relative to the job's working directory on the cluster")
    return url


def _settings_of(state: JobState) -> tuple[str, RunSettings]:
    """The job's subcommand and run settings: from its entrypoint and a config readable here (a URL or
    absolute path), else what its submission recorded from the shipped config (metadata)."""
    try:
        tokens = shlex.split(state.entrypoint)
    except ValueError:
        tokens = []
    is_maskdiet = bool(tokens) and Path(tokens[0]).name == "maskdiet"
    subcommand = tokens[1] if is_maskdiet and len(tokens) > 1 else ""
    config = config_named_in(tokens)
    readable = config if config and ("://" in config or os.path.isabs(config)) else None
    now = run_settings(subcommand, tokens, state.submission_id, readable) if subcommand else RunSettings()
    meta = state.metadata
    return subcommand, RunSettings(
        output=now.output or meta.get("output"),
        tune_output=now.tune_output or meta.get("tune_output"),
        run_id=now.run_id or meta.get("run_id"),
    )


def result_location(state: JobState) -> ResultLocation | None:
    """Where the job's run writes its result.json; None when the job makes no run (not `run`, `curate`,
    `pretrain` or `sweep`). `curate` and `pretrain` write into their output folder, `run` into
    `<output>/runs/<run_id>`, `sweep` into `<tune.output or output/sweeps>/<name>`."""
    subcommand, settings = _settings_of(state)
    if subcommand not in RUN_COMMANDS:
        return None
    try:
        if not settings.run_id:
            raise _Unknown(
                "the job's run id is not known here (it is chosen when the run starts: name it with "
                "--set run_id=ID, or --name for a sweep)"
            )
        if subcommand == "sweep":
            root = settings.tune_output or join(_known_folder(settings.output, "output"), "sweeps")
            dir_url = join(_known_folder(root, "sweep folder (tune.output)"), settings.run_id)
        elif subcommand == "run":
            dir_url = run_dir_for(_known_folder(settings.output, "output"), settings.run_id)
        else:
            dir_url = _known_folder(settings.output, "output")
    except _Unknown as e:
        return ResultLocation(None, settings.run_id, str(e))
    return ResultLocation(dir_url, settings.run_id)


def job_outputs(state: JobState, storage_options: dict[str, Any] | None = None) -> JobState:
    """Fill `state.outputs` from the result.json of the job's run; when they cannot be had (location not
    known here, not written yet, written by another run), `state.outputs_note` says why."""
    where = result_location(state)
    if where is None:
        return state
    if where.dir_url is None:
        state.outputs_note = where.unknown
        return state
    state.result_url = result_url(where.dir_url)
    # An unreadable store or file must not hide the job's status: say what failed instead.
    try:
        result = read_result(where.dir_url, storage_options)
    except MaskdietError as e:  # names the file already
        state.outputs_note = str(e)
        return state
    except OSError as e:  # e.g. a store that refuses our credentials
        state.outputs_note = f"cannot read {state.result_url}: {type(e).__name__}: {e}"
        return state
    if result is not None and str(result.get("run_id")) == where.run_id:
        state.outputs = {str(k): str(v) for k, v in result["outputs"].items()}
    elif not state.finished:
        state.outputs_note = f"not written yet (the job is {state.status}); it will be at {state.result_url}"
    elif result is None:
        state.outputs_note = (
            f"no result at {state.result_url}: the job ended {state.status} before writing it"
        )
    else:  # curate and pretrain runs that share an output folder: the latest one's file wins
        state.outputs_note = (
            f"{state.result_url} is from run {result.get('run_id')}, not this job's run {where.run_id}: "
            "another run has written to the same output since"
        )
    return state


def job_status(
    client: Any,
    submission_id: str,
    with_outputs: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> JobState:
    """The job's state; with `with_outputs`, also its outputs, read from the result.json its run writes
    (`job_outputs`; `storage_options` reach the store, by default the AWS_* variables)."""
    state = _state(_call(client, "get_job_info", submission_id))
    if with_outputs:
        job_outputs(state, storage_options)
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
