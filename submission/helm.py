"""``make helm``: evaluate our running server with HELM, the way the challenge's organizers do.

The organizers run HELM (the ``crfm-helm`` package) with the model ``neurips/local`` against the
competitor's HTTP server. This module reproduces that locally:

1. installs ``crfm-helm`` into its own virtual environment (``.venv-helm``, never our ``.venv``: HELM
   pins its own torch/transformers/numpy). Idempotent: a stamp file records the installed version.
2. checks that the server answers (``GET /health``, else the organizers' ``POST /process``
   ``{"prompt": "The capital of France is "}``).
3. runs ``helm-run --conf-paths <conf> --suite <suite> --max-eval-instances <n> ...`` and then
   ``helm-summarize --suite <suite>``; everything HELM writes goes under ``out/helm/``, its console
   output into ``out/helm/<suite>-helm-run.log`` / ``-helm-summarize.log``.

How HELM finds the server (crfm-helm 0.5.16, read from the installed package):
``helm/config/model_deployments.yaml`` maps ``neurips/local`` to
``helm.clients.http_model_client.HTTPModelClient`` with no arguments, and
``helm/config/tokenizer_configs.yaml`` maps its tokenizer to
``helm.tokenizers.http_model_tokenizer.HTTPModelTokenizer``. Both default to
``base_url="http://localhost:8080"`` and both replace it with the environment variable
``HELM_HTTP_MODEL_BASE_URL`` when that is set (``helm/clients/http_model_client.py``,
``helm/tokenizers/http_model_tokenizer.py``). So the server URL is passed through that variable;
no model_deployments.yaml of our own is needed.

Two HELM behaviours this module works around or explains:

* ``--max-eval-instances`` only applies to run specs that do not set ``max_eval_instances``
  themselves (``helm/benchmark/run.py``), and every entry of the challenge conf sets it. So the conf
  is rewritten into ``out/helm/<suite>-run_specs.conf`` with each entry's cap lowered to
  ``min(own, max_eval_instances)``; that file is what ``helm-run`` reads.
* HELM downloads every scenario's data from the internet on first use (into
  ``out/helm/benchmark_output/scenarios/``). Without internet access the run fails; this module
  recognises that in HELM's output and says so in one message instead of a wall of tracebacks.
  BIG-bench specs download their task file while the run specs are being built, so with the
  challenge conf HELM stops before it evaluates anything.

``--smoke true`` runs HELM's built-in ``simple_mcqa`` scenario instead of the conf: it needs no
download, so it checks the whole HELM -> server wiring (``/tokenize``, ``/process``) offline too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.run_specs import parse_run_entries  # one parser for make helm and the contamination guard (finetune.eval_guard)

REPO_ROOT = Path(__file__).resolve().parents[1]
HELM_VERSION = "0.5.16"  # newest on PyPI; pip refuses 0.3.0-0.5.3 here (Requires-Python <3.11).
# 0.5.16 still ships neurips/local (helm/config/model_deployments.yaml).
DEFAULT_CONF = REPO_ROOT / "data" / "helm" / "run_specs_challenge.conf"
DEFAULT_OUT_DIR = REPO_ROOT / "out" / "helm"
DEFAULT_VENV = REPO_ROOT / ".venv-helm"
STAMP_NAME = ".onegpu-helm-installed"
MODEL = "neurips/local"
SMOKE_RUN_ENTRY = f"simple_mcqa:model={MODEL}"  # HELM's built-in toy scenario: nothing to download
HEALTH_PROMPT = "The capital of France is "  # the organizers' health check

# Where HELM 0.5.16 downloads the challenge scenarios' data from, by the path (under
# benchmark_output/scenarios/) it downloads to. HELM's log does not print these URLs (its urllib
# download path prints the literal text "Downloading source_url"), so they are read off the
# scenario sources (helm/benchmark/scenarios/<name>_scenario.py) and matched on the target path.
SCENARIO_SOURCES: tuple[tuple[str, str], ...] = (
    (r"big_bench/(.+)/task\.json", "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks/{0}/task.json"),
    (r"mmlu/data", "https://people.eecs.berkeley.edu/~hendrycks/data.tar"),
    (r"gsm/gsm_data_(\w+)", "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data//{0}.jsonl"),
    (
        r"truthful_qa/data/TruthfulQA\.csv",
        "https://raw.githubusercontent.com/sylinrl/TruthfulQA/d71c110897f5d31c5d7f309e7bc316c152f6f031/data/v1/TruthfulQA.csv",
    ),
    (r"bbq/data/(\w+)", "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data/{0}.jsonl"),
    (
        r"summarization/data/(\w+)\.pk",
        "https://storage.googleapis.com/crfm-helm-public/source_datasets/scenarios/summarization_scenario/{0}.pk",
    ),
)

# Text in HELM's output that means "a network fetch failed" (DNS, no route, refused, sandbox refusal,
# Hugging Face offline, wget's exit code 4 = network failure).
_NETWORK_ERRORS = re.compile(
    r"Name or service not known|Temporary failure in name resolution|nodename nor servname"
    r"|unable to resolve host address|Network is unreachable|No route to host|Connection refused"
    r"|Connection reset|timed out|no validated address for host|refusing to connect"
    r"|Max retries exceeded|NameResolutionError|Failed to establish a new connection"
    r"|Couldn't reach|couldn't connect to|OfflineModeIsEnabled|LocalEntryNotFoundError"
    r"|Failed with exit code 4: wget",
    re.IGNORECASE,
)
# Frames or log lines that show a dataset download was under way.
_DOWNLOAD_CONTEXT = re.compile(
    r"ensure_file_downloaded|urlretrieve|load_dataset|snapshot_download|hf_hub_download|huggingface_hub"
    r"|Executing: (wget|gdown) ",
)
# HELM's client and tokenizer for neurips/local: their errors are about our server, not datasets.
_OUR_SERVER_CLIENT = re.compile(r"http_model_client\.py|http_model_tokenizer\.py")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \w+ ")
_SCENARIO_FRAME = re.compile(r'File ".*?/helm/benchmark/scenarios/(\w+?)_scenario\.py", line \d+, in (\w+)')
_URL = re.compile(r"https?://[^\s'\"<>()]+")


@dataclass(frozen=True)
class HelmCommand:
    """One HELM command line and the full environment to run it with."""

    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class DownloadFailure:
    """A HELM error that came from fetching a scenario's data without network access."""

    run_spec: str | None  # the run spec HELM was running (None: failed while building run specs)
    scenario: str | None  # module name under helm/benchmark/scenarios/, e.g. "big_bench"
    error: str  # the last exception line, e.g. "urllib.error.URLError: <urlopen error ...>"
    urls: tuple[str, ...] = ()  # URLs named in HELM's output for this error (wget / Hugging Face)


def cap_run_specs(conf_text: str, max_eval_instances: int) -> str:
    """Lower every ``max_eval_instances=K`` in the conf's descriptions to ``min(K, max_eval_instances)``.

    HELM's ``--max-eval-instances`` does not override a cap written in the run spec itself, so this
    is how a smaller run is requested. Entries without their own cap get HELM's flag.
    """

    def cap(match: re.Match) -> str:
        return f"max_eval_instances={min(int(match.group(1)), max_eval_instances)}"

    out = []
    for line in conf_text.splitlines(keepends=True):
        out.append(line if line.lstrip().startswith("#") else re.sub(r"max_eval_instances=(\d+)", cap, line))
    return "".join(out)


def helm_env(server_url: str, venv: Path, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for HELM: ``HELM_HTTP_MODEL_BASE_URL`` set to the server and the server's host
    exempted from any HTTP proxy; our own venv's PYTHONPATH/PYTHONHOME removed."""
    env = dict(os.environ if base_env is None else base_env)
    for key in ("PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    env["HELM_HTTP_MODEL_BASE_URL"] = server_url.rstrip("/")
    env["PYTHONUNBUFFERED"] = "1"
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join(filter(None, [str(venv / "bin"), env.get("PATH", "")]))
    host = urlsplit(server_url).hostname or ""
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in env.get(key, "").split(",") if h]
        env[key] = ",".join(hosts + [h for h in (host, "localhost", "127.0.0.1") if h and h not in hosts])
    return env


def build_commands(
    server_url: str,
    suite: str,
    max_eval_instances: int,
    conf: Path,
    venv: Path = DEFAULT_VENV,
    out_dir: Path = DEFAULT_OUT_DIR,
    num_threads: int = 30,
    smoke: bool = False,
    helm_args: list[str] | None = None,
    base_env: dict[str, str] | None = None,
) -> tuple[HelmCommand, HelmCommand]:
    """The ``helm-run`` and ``helm-summarize`` commands (argv + env); pure, so it can be tested.

    Args:
        server_url: base URL of our server, e.g. ``http://127.0.0.1:8080`` (no trailing path).
        suite: HELM suite name; results go to ``<out_dir>/benchmark_output/runs/<suite>/``.
        max_eval_instances: ``--max-eval-instances`` (for run specs without their own cap).
        conf: the run-spec conf ``helm-run`` reads (ignored when ``smoke``).
        venv: the HELM virtual environment.
        out_dir: HELM's output (``benchmark_output``) and local state (``prod_env``) go under it.
        num_threads: ``helm-run -n``: parallel requests (the organizers use 30).
        smoke: run HELM's built-in ``simple_mcqa`` scenario instead of the conf.
        helm_args: extra arguments appended to ``helm-run``.
        base_env: environment to start from (default: ``os.environ``).
    """
    bench_out = out_dir / "benchmark_output"
    local_path = out_dir / "prod_env"
    env = helm_env(server_url, venv, base_env)
    specs = ["--run-entries", SMOKE_RUN_ENTRY] if smoke else ["--conf-paths", str(conf)]
    run = [
        str(venv / "bin" / "helm-run"),
        *specs,
        "--suite", suite,
        "--max-eval-instances", str(max_eval_instances),
        "--output-path", str(bench_out),
        "--local-path", str(local_path),
        "--num-threads", str(num_threads),
        *(helm_args or []),
    ]  # fmt: skip
    summarize = [
        str(venv / "bin" / "helm-summarize"),
        "--suite", suite,
        "--output-path", str(bench_out),
        "--local-path", str(local_path),
    ]  # fmt: skip
    return HelmCommand(run, env), HelmCommand(summarize, env)


def _error_blocks(log_text: str) -> list[tuple[str | None, str]]:
    """Split HELM's output into its error reports: (run spec or None, text of the report).

    HELM logs ``Error when running <spec>:`` plus a traceback for each failed run spec and goes on;
    an error outside ``Runner.run_all`` (e.g. while building run specs) ends in a bare traceback.
    """
    blocks: list[tuple[str | None, str]] = []
    current: list[str] | None = None
    spec: str | None = None
    running: str | None = None
    for line in log_text.splitlines():
        started = re.search(r"\bRunning (\S.*) \{$", line)
        if started and _LOG_LINE.match(line):
            running = started.group(1)
        failed = re.search(r"Error when running (.+):$", line)
        if failed:
            if current is not None:
                blocks.append((spec, "\n".join(current)))
            current, spec = [line], failed.group(1)
        elif line.startswith("Traceback (most recent call last)") and current is None:
            current, spec = [line], running
        elif current is not None:
            if _LOG_LINE.match(line):  # the report ended; a new log line follows
                blocks.append((spec, "\n".join(current)))
                current, spec = None, None
            else:
                current.append(line)
        # downloads logged just before a traceback belong to it (e.g. "Executing: wget <url>")
        if current is None and re.search(r"Executing: (wget|gdown) ", line):
            blocks.append((None, line))
    if current is not None:
        blocks.append((spec, "\n".join(current)))
    return blocks


def find_download_failures(log_text: str, server_url: str | None = None) -> list[DownloadFailure]:
    """The errors in HELM's output that are failed dataset downloads (offline machine), in order.

    An error counts when its traceback shows a download under way (``ensure_file_downloaded``,
    ``urlretrieve``, Hugging Face ``load_dataset`` / hub, ``wget``) and a network error (DNS failure,
    refused or unreachable, offline mode). Errors reaching our own server (``server_url``) never count.
    """
    failures: list[DownloadFailure] = []
    pending_urls: list[str] = []
    for spec, text in _error_blocks(log_text):
        if "\n" not in text and re.search(r"Executing: (wget|gdown) ", text):
            pending_urls += _URL.findall(text)
            continue
        if not (_DOWNLOAD_CONTEXT.search(text) and _NETWORK_ERRORS.search(text)):
            continue
        if _OUR_SERVER_CLIENT.search(text):  # HELM's neurips/local client failing to reach our server
            continue
        urls = [u.rstrip(".,:;") for u in pending_urls + _URL.findall(text)]
        pending_urls = []
        if server_url:
            urls = [u for u in urls if not u.startswith(server_url.rstrip("/"))]
        frames = _SCENARIO_FRAME.findall(text)
        error_lines = [ln.strip() for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b.*:", ln.strip())]
        error = error_lines[-1] if error_lines else text.strip().splitlines()[-1].strip()
        failures.append(DownloadFailure(spec, frames[-1][0] if frames else None, error, tuple(dict.fromkeys(urls))))
    return failures


def source_url(target: str) -> str | None:
    """The URL HELM 0.5.16 downloads ``target`` (a path under ``benchmark_output/scenarios/``) from."""
    for pattern, url in SCENARIO_SOURCES:
        match = re.fullmatch(pattern, target)
        if match:
            return url.format(*match.groups())
    return None


def unfinished_downloads(scenarios_dir: Path, scenarios: set[str] | None = None) -> list[str]:
    """Downloads HELM started and did not finish: a ``<target>.lock`` left behind with no ``<target>``.

    HELM's ``ensure_file_downloaded`` takes a file lock next to its target and never removes it, so
    a lock without its target is data that is still missing (from this run or an earlier one).
    ``scenarios`` keeps only targets under those scenario folders (e.g. ``{"big_bench"}``).
    """
    if not scenarios_dir.is_dir():
        return []
    found = []
    for lock in sorted(scenarios_dir.rglob("*.lock")):
        target = lock.with_suffix("").relative_to(scenarios_dir)
        if not (scenarios_dir / target).exists() and (scenarios is None or target.parts[0] in scenarios):
            found.append(target.as_posix())
    return found


def offline_message(failures: list[DownloadFailure], missing: list[str], server_url: str, log: Path, scenarios_dir: Path) -> str:
    """The one error message for a run that failed because HELM could not download its datasets."""
    lines = ["error: HELM could not download the scenario datasets (no internet access from this machine)."]
    for target in missing:
        url = source_url(target)
        lines.append(f"  not downloaded: scenarios/{target}" + (f" from {url}" if url else ""))
    groups: dict[tuple[str | None, str], list[DownloadFailure]] = {}
    for failure in failures:  # one line per scenario and error, not per run spec
        groups.setdefault((failure.scenario, failure.error), []).append(failure)
    for (scenario, error), group in groups.items():
        specs = [f.run_spec for f in group if f.run_spec]
        where = "while building the run specs" if not specs else specs[0]
        if len(specs) > 1:
            where = f"{len(specs)} run specs, e.g. {specs[0]}"
        lines.append(f"  failed: {where}" + (f" [{scenario} scenario]" if scenario else "") + f": {error}")
        urls = dict.fromkeys(u for f in group for u in f.urls)
        lines += [f"    url: {u}" for u in urls]
    lines += [
        "  HELM fetches each scenario's data (BIG-bench, MMLU, TruthfulQA, CNN/DM, GSM8K, BBQ) from the internet",
        f"  on first use and keeps it in {_rel(scenarios_dir)}/.",
        "  what to do: run `make helm` on a machine with internet access that can reach the server; this run",
        f"  pointed HELM at HELM_HTTP_MODEL_BASE_URL={server_url.rstrip('/')} (another: make helm HOST=... PORT=..., or --server_url).",
        f"  Or copy a filled {_rel(scenarios_dir)}/ from such a machine here: HELM skips files that exist.",
        "  To check the HELM <-> server wiring offline: make helm ARGS='--smoke true' (nothing to download).",
        f"  HELM's full output: {_rel(log)}",
    ]
    return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def server_health(server_url: str, wait_s: float = 30.0, timeout: float = 10.0) -> str:
    """Check that the server answers: ``GET /health``, else the organizers' ``POST /process``.

    Polls for up to ``wait_s`` seconds while nothing listens (a server still loading its model).
    Returns a one-line description; raises ``SystemExit`` with a clear message when nothing answers.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is local: no proxy
    base = server_url.rstrip("/")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with opener.open(f"{base}/health", timeout=timeout) as response:
                return f"GET /health -> {response.status} {response.read(200).decode(errors='replace')}"
        except urllib.error.HTTPError:
            break  # no /health (another server): try the organizers' check
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise SystemExit(
                f"error: no server answers at {base} ({getattr(e, 'reason', e)}; waited {wait_s:.0f} s).\n"
                f"  Start one first, e.g. `make serve CKPT=checkpoints/tiny-lora` or\n"
                f"  `.venv/bin/python -m server --checkpoint_dir checkpoints/tiny-lora --port 8080`, then rerun."
            ) from None
    body = json.dumps({"prompt": HEALTH_PROMPT, "max_new_tokens": 1}).encode()
    request = urllib.request.Request(f"{base}/process", data=body, headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=max(timeout, 60.0)) as response:
            text = json.loads(response.read()).get("text", "")
            return f"POST /process -> {response.status} {text!r}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SystemExit(f"error: the server at {base} does not answer POST /process: {e}") from None


def install_failure_message(spec: str, venv: Path, step: str, code: int, output: str, log: Path) -> str:
    """The one error message for a failed HELM install, from pip's (or venv's) ``output``."""
    errors = [ln.strip() for ln in output.splitlines() if ln.startswith("ERROR")] or output.strip().splitlines()[-1:]
    lines = [f"error: could not install {spec} into {_rel(venv)} ({step} exited {code})."]
    lines += [f"  {e}" for e in errors[-3:]]
    if _NETWORK_ERRORS.search(output):
        lines.append("  PyPI could not be reached: installing HELM needs access to PyPI.")
    elif "No matching distribution" in output:
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        lines.append(f"  pip has no {spec} for Python {python} "
                     "(crfm-helm 0.3.0-0.5.3 require Python < 3.11; 0.5.4 and later install on 3.11).")  # fmt: skip
    lines.append(f"  full output: {_rel(log)} (rerun `make helm` to retry; a broken venv can go: rm -rf {_rel(venv)})")
    return "\n".join(lines)


def ensure_helm(venv: Path, version: str, log: Path, python: str = sys.executable) -> None:
    """Install ``crfm-helm==version`` into ``venv`` unless its stamp says it is there already.

    The first install takes about 4-5 minutes and ~6.5 GB (HELM depends on torch, which pip takes with
    its CUDA libraries). pip's output goes to ``log``; a failure exits with one message.
    """
    stamp = venv / STAMP_NAME
    spec = f"crfm-helm=={version}"
    if stamp.is_file() and stamp.read_text().strip() == spec and (venv / "bin" / "helm-run").exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {spec} into {_rel(venv)} (first time: ~5 min, ~6.5 GB; pip output: {_rel(log)})", flush=True)
    start = time.time()
    steps = {"python -m venv": [python, "-m", "venv", str(venv)]}
    if (venv / "bin" / "python").exists():
        steps.clear()
    steps["pip install"] = [str(venv / "bin" / "python"), "-m", "pip", "install", spec]
    with log.open("w") as f:
        for name, argv in steps.items():
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
            if code != 0:
                raise SystemExit(install_failure_message(spec, venv, name, code, log.read_text(errors="replace"), log))
    stamp.write_text(spec + "\n")
    print(f"installed {spec} in {time.time() - start:.0f} s", flush=True)


def run_logged(command: HelmCommand, log: Path, verbose: bool = False) -> int:
    """Run a HELM command with all its output in ``log``; echo only progress lines (all if verbose)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(f"$ HELM_HTTP_MODEL_BASE_URL={command.env['HELM_HTTP_MODEL_BASE_URL']} {' '.join(command.argv)}\n")
        f.flush()
        proc = subprocess.Popen(command.argv, env=command.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if verbose:
                    print(line, end="", flush=True)
                elif progress := _progress(line):
                    print(f"  [helm] {progress}", flush=True)
        except BaseException:  # interrupted (Ctrl-C): do not leave helm-run running
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        return proc.wait()


def _progress(line: str) -> str | None:
    """The progress worth echoing from one line of HELM's output: run specs started or failed."""
    if not _LOG_LINE.match(line):
        return None
    m = re.search(r"\bRunning (\S.*) \{$|(\d+ entries produced \d+ run specs)|Error when running (.+):$", line)
    if not m:
        return None
    return f"running {m.group(1)}" if m.group(1) else m.group(2) or f"FAILED {m.group(3)}"


def _last_error(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b.*:", ln.strip())]
    return lines[-1] if lines else (log_text.strip().splitlines() or ["(no output)"])[-1]


SERVER_WAIT_S = 30.0  # main's --server_wait_s default


def refuse_unread(smoke: bool, conf: Path, skip_health_check: bool, server_wait_s: float) -> None:
    """An option the chosen mode skips, set all the same, is refused naming it (before HELM is installed)."""
    if smoke and Path(conf).resolve() != DEFAULT_CONF.resolve():
        raise SystemExit(f"error: --conf: --smoke runs HELM's built-in simple_mcqa scenario, so {conf} would not be read; drop one of them")
    if skip_health_check and server_wait_s != SERVER_WAIT_S:
        raise SystemExit("error: --server_wait_s: how long the server health check waits, and --skip_health_check skips it; drop one of them")


def main(
    server_url: str = "http://127.0.0.1:8080",
    suite: str = "onegpu",
    max_eval_instances: int = 1000,
    conf: Path = DEFAULT_CONF,
    out_dir: Path = DEFAULT_OUT_DIR,
    venv: Path = DEFAULT_VENV,
    helm_version: str = HELM_VERSION,
    num_threads: int = 30,
    smoke: bool = False,
    install_only: bool = False,
    skip_health_check: bool = False,
    server_wait_s: float = SERVER_WAIT_S,
    verbose: bool = False,
    helm_args: list[str] | None = None,
) -> None:
    """Install HELM if needed, check the server, run ``helm-run`` and ``helm-summarize`` against it.

    Args:
        server_url: our server's base URL; HELM gets it as ``HELM_HTTP_MODEL_BASE_URL``.
        suite: HELM suite name; results in ``<out_dir>/benchmark_output/runs/<suite>/``.
        max_eval_instances: at most this many eval instances per run spec (the conf's own caps are
            lowered to it; 1000, HELM's usual default, keeps the conf as the organizers ran it).
        conf: HELM run-spec conf (default: the challenge's specs, data/helm/run_specs_challenge.conf); refused with smoke.
        out_dir: where HELM's output, state and console logs go.
        venv: HELM's own virtual environment (created if missing; never our .venv).
        helm_version: crfm-helm version to install.
        num_threads: parallel requests (``helm-run -n``; the organizers use 30).
        smoke: run HELM's built-in simple_mcqa scenario instead of the conf (needs no download:
            checks HELM <-> server offline).
        install_only: install HELM and stop.
        skip_health_check: do not check the server before running HELM.
        server_wait_s: how long to wait for the server to answer before giving up; refused with skip_health_check.
        verbose: echo all of HELM's output, not only progress lines.
        helm_args: extra arguments for ``helm-run``, e.g. ``[--skip-completed-runs]``.
    """
    refuse_unread(smoke, conf, skip_health_check, server_wait_s)
    out_dir = Path(out_dir)
    ensure_helm(Path(venv), helm_version, out_dir / "install.log")
    if install_only:
        print(f"crfm-helm {helm_version} is installed in {_rel(Path(venv))}")
        return
    if not skip_health_check:
        print(f"server {server_url}: {server_health(server_url, server_wait_s)}", flush=True)

    run_conf = out_dir / f"{suite}-run_specs.conf"
    if not smoke:
        text = Path(conf).read_text()
        out_dir.mkdir(parents=True, exist_ok=True)
        run_conf.write_text(cap_run_specs(text, max_eval_instances))
        print(f"run specs: {len(parse_run_entries(text))} entries from {_rel(Path(conf))}, at most {max_eval_instances} "
              f"instances each -> {_rel(run_conf)}", flush=True)  # fmt: skip
    run, summarize = build_commands(server_url, suite, max_eval_instances, run_conf, Path(venv), out_dir, num_threads, smoke, helm_args)
    run_log, summarize_log = out_dir / f"{suite}-helm-run.log", out_dir / f"{suite}-helm-summarize.log"
    scenarios_dir = out_dir / "benchmark_output" / "scenarios"
    print(f"helm-run (HELM_HTTP_MODEL_BASE_URL={run.env['HELM_HTTP_MODEL_BASE_URL']}; output: {_rel(run_log)})", flush=True)
    code = run_logged(run, run_log, verbose)
    log_text = run_log.read_text(errors="replace")
    failures = find_download_failures(log_text, server_url)
    if failures:
        scenarios = {f.scenario for f in failures}
        missing = unfinished_downloads(scenarios_dir, None if None in scenarios else scenarios)  # type: ignore[arg-type]
        raise SystemExit(offline_message(failures, missing, server_url, run_log, scenarios_dir))
    if code != 0:
        raise SystemExit(f"error: helm-run exited {code}: {_last_error(log_text)}\n  HELM's full output: {_rel(run_log)}")
    if "[nltk_data] Error loading" in log_text:
        print("  note: HELM could not download nltk data (no internet); metrics that need it may be missing", flush=True)

    print(f"helm-summarize (output: {_rel(summarize_log)})", flush=True)
    code = run_logged(summarize, summarize_log, verbose)
    if code != 0:
        text = summarize_log.read_text(errors="replace")
        raise SystemExit(f"error: helm-summarize exited {code}: {_last_error(text)}\n  HELM's full output: {_rel(summarize_log)}")
    results = out_dir / "benchmark_output" / "runs" / suite
    print(f"done: results in {_rel(results)}/ (summary.json, groups/*.json)")
    print(f"browse: {_rel(Path(venv))}/bin/helm-server --output-path {_rel(out_dir / 'benchmark_output')} --suite {suite}")


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
