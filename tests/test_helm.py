"""``make helm`` (submission/helm.py) without installing HELM: the conf, the commands, the log reading.

The HELM logs under tests/fixtures/helm/ are real output of crfm-helm 0.5.16 on this project's
offline machine against our tiny server (lines over 400 characters cut):
- offline_full_conf.log: ``make helm HELM_MAX_EVAL=2`` with the challenge conf: BIG-bench's task file
  cannot be fetched while HELM builds the run specs, so helm-run stops at once.
- offline_per_run_spec.log: a conf with one MMLU, TruthfulQA, CNN/DM, GSM8K and BBQ entry each:
  every run spec fails on its own download ("Error when running ...").
- smoke_ok.log: ``--smoke true`` (HELM's simple_mcqa, nothing to download) succeeding; nltk's failed
  punkt_tab download is only a warning there.
- server_down.log: the smoke run with no server listening (excerpt): HELM's neurips/local tokenizer
  and client cannot connect. Not a dataset problem.
- pip_no_version.log: pip asked for crfm-helm==0.4.0 on Python 3.11 (the ERROR lines).
"""

from __future__ import annotations

import http.server
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from submission import helm

FIXTURES = Path(__file__).parent / "fixtures"
HELM_LOGS = FIXTURES / "helm"
SHARED_COPY = FIXTURES / "run_specs_full_coarse_600_budget.conf"
SHARED_ORIGINAL = helm.REPO_ROOT.parent / "shared" / "challenge" / "run_specs_full_coarse_600_budget.conf"


def _log(name: str) -> str:
    return (HELM_LOGS / name).read_text()


# --- the conf ---------------------------------------------------------------------------------


def test_conf_lists_exactly_the_challenge_specs():
    ours = helm.parse_run_entries(helm.DEFAULT_CONF.read_text())
    theirs = helm.parse_run_entries(SHARED_COPY.read_text())
    assert len(theirs) == 88
    assert ours == theirs
    assert all("model=neurips/local" in d for d in ours)


@pytest.mark.skipif(not SHARED_ORIGINAL.is_file(), reason="shared/ is not beside this checkout")
def test_fixture_copy_matches_shared_original():
    assert SHARED_COPY.read_text() == SHARED_ORIGINAL.read_text()


def test_conf_keeps_helms_layout_and_a_header():
    text = helm.DEFAULT_CONF.read_text()
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert body[0] == "entries: [" and body[-1] == "]"
    header = text.split("entries: [")[0]
    assert "run_specs_full_coarse_600_budget.conf" in header and "HELM_MAX_EVAL" in header


def test_parse_run_entries_skips_comments():
    text = '# {description: "commented:model=x",priority: 1}\nentries: [\n{description: "a:model=x",priority: 1}\n]\n'
    assert helm.parse_run_entries(text) == ["a:model=x"]


def test_cap_run_specs_lowers_each_spec_to_the_limit():
    text = helm.DEFAULT_CONF.read_text()
    capped = helm.cap_run_specs(text, 2)
    entries = helm.parse_run_entries(capped)
    assert len(entries) == 88
    assert all("max_eval_instances=2" in e for e in entries)
    # everything but the numbers is unchanged, comments included
    original = helm.parse_run_entries(text)
    assert [e.rsplit("max_eval_instances=", 1)[0] for e in entries] == [e.rsplit("max_eval_instances=", 1)[0] for e in original]
    assert [ln for ln in capped.splitlines() if ln.startswith("#")] == [ln for ln in text.splitlines() if ln.startswith("#")]
    # a limit above every spec's own cap changes nothing (the organizers' run)
    assert helm.cap_run_specs(text, 1000) == text
    assert helm.cap_run_specs('{description: "gsm:model=x,max_eval_instances=19"}', 5) == '{description: "gsm:model=x,max_eval_instances=5"}'


# --- the commands -----------------------------------------------------------------------------


def test_build_commands_argv_and_env(tmp_path):
    venv, out, conf = tmp_path / "venv", tmp_path / "out", tmp_path / "x.conf"
    base_env = {"PATH": "/usr/bin", "PYTHONPATH": "/somewhere", "NO_PROXY": "example.org", "HOME": "/root"}
    run, summarize = helm.build_commands("http://10.1.2.3:8080/", "v1", 7, conf, venv=venv, out_dir=out, num_threads=30, base_env=base_env)
    assert run.argv == [
        str(venv / "bin" / "helm-run"),
        "--conf-paths", str(conf),
        "--suite", "v1",
        "--max-eval-instances", "7",
        "--output-path", str(out / "benchmark_output"),
        "--local-path", str(out / "prod_env"),
        "--num-threads", "30",
    ]  # fmt: skip
    assert summarize.argv == [
        str(venv / "bin" / "helm-summarize"),
        "--suite", "v1",
        "--output-path", str(out / "benchmark_output"),
        "--local-path", str(out / "prod_env"),
    ]  # fmt: skip
    for env in (run.env, summarize.env):
        assert env["HELM_HTTP_MODEL_BASE_URL"] == "http://10.1.2.3:8080"  # what neurips/local reads
        assert "PYTHONPATH" not in env
        assert env["NO_PROXY"].split(",")[:2] == ["example.org", "10.1.2.3"]
        assert "10.1.2.3" in env["no_proxy"].split(",")
        assert env["PATH"].split(":")[0] == str(venv / "bin")
        assert env["HOME"] == "/root"
    assert base_env["PYTHONPATH"] == "/somewhere"  # the caller's dict is not touched


def test_build_commands_smoke_and_extra_args(tmp_path):
    run, _ = helm.build_commands(
        "http://127.0.0.1:8080", "s", 3, tmp_path / "ignored.conf", venv=tmp_path, out_dir=tmp_path,
        smoke=True, helm_args=["--skip-completed-runs"], base_env={},
    )  # fmt: skip
    assert run.argv[1:3] == ["--run-entries", "simple_mcqa:model=neurips/local"]
    assert "--conf-paths" not in run.argv
    assert run.argv[-1] == "--skip-completed-runs"


def test_makefile_helm_target_passes_the_variables():
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no make")
    out = subprocess.run(
        ["make", "-n", "helm", "HELM_MAX_EVAL=2", "SUITE=s1", "PORT=9999", "HELM_VENV=/tmp/hv"],
        cwd=helm.REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(ln for ln in out.splitlines() if "submission.helm" in ln)
    for part in ("--server_url http://127.0.0.1:9999", "--suite s1", "--max_eval_instances 2", "--venv /tmp/hv"):
        assert part in line


# --- reading HELM's output --------------------------------------------------------------------


def test_offline_full_conf_fails_while_building_run_specs():
    failures = helm.find_download_failures(_log("offline_full_conf.log"), "http://127.0.0.1:8080")
    assert len(failures) == 1
    (failure,) = failures
    assert failure.run_spec is None  # before any run spec ran
    assert failure.scenario == "big_bench"
    assert failure.error.startswith("urllib.error.URLError") and "Name or service not known" in failure.error


def test_offline_each_run_spec_fails_on_its_download():
    failures = helm.find_download_failures(_log("offline_per_run_spec.log"), "http://127.0.0.1:8080")
    assert [f.scenario for f in failures] == ["mmlu", "truthful_qa", "summarization", "gsm", "bbq"]
    assert [f.run_spec.split(":")[0] for f in failures] == ["mmlu", "truthful_qa", "summarization_cnndm", "gsm", "bbq"]
    assert all("Name or service not known" in f.error for f in failures)


@pytest.mark.parametrize("name", ["smoke_ok.log", "server_down.log"])
def test_no_download_failure_in_other_logs(name):
    assert helm.find_download_failures(_log(name), "http://127.0.0.1:8080") == []


def test_wget_download_failure_names_its_url():
    # Not observed here (the challenge's scenarios use urllib in 0.5.16); built from HELM's own
    # messages in helm/common/general.py (shell(): "Executing: ...", "Failed with exit code N: ...").
    url = "https://example.org/data/x.tar.gz"
    log = (
        f"2026-11-23 17:15:50,461 INFO       Running foo:model=neurips_local {{\n"
        f"2026-11-23 17:15:50,462 INFO           Executing: wget {url} -O out/scenarios/foo/x.tar.gz.tmp\n"
        f"--2026-11-23 17:15:50--  {url}\n"
        "Resolving example.org (example.org)... failed: Name or service not known.\n"
        "wget: unable to resolve host address 'example.org'\n"
        "2026-11-23 17:15:50,538 INFO       Error when running foo:model=neurips_local:\n"
        "Traceback (most recent call last):\n"
        '  File "/v/lib/python3.11/site-packages/helm/benchmark/scenarios/foo_scenario.py", line 9, in get_instances\n'
        '  File "/v/lib/python3.11/site-packages/helm/common/general.py", line 105, in ensure_file_downloaded\n'
        f"Exception: Failed with exit code 4: wget {url} -O out/scenarios/foo/x.tar.gz.tmp\n"
        "2026-11-23 17:15:50,540 INFO     } [3.445s]\n"
    )
    (failure,) = helm.find_download_failures(log)
    assert failure.run_spec == "foo:model=neurips_local" and failure.scenario == "foo"
    assert url in failure.urls


def test_unfinished_downloads_and_their_urls(tmp_path):
    scenarios = tmp_path / "scenarios"
    (scenarios / "big_bench" / "auto_debugging").mkdir(parents=True)
    (scenarios / "big_bench" / "auto_debugging" / "task.json.lock").touch()
    (scenarios / "mmlu").mkdir()
    (scenarios / "mmlu" / "data.lock").touch()
    (scenarios / "gsm").mkdir()
    (scenarios / "gsm" / "gsm_data_train.lock").touch()
    (scenarios / "gsm" / "gsm_data_train").write_text("{}")  # downloaded: not missing
    assert helm.unfinished_downloads(scenarios) == ["big_bench/auto_debugging/task.json", "mmlu/data"]
    assert helm.unfinished_downloads(scenarios, {"mmlu"}) == ["mmlu/data"]
    assert helm.unfinished_downloads(tmp_path / "nothing") == []
    assert helm.source_url("big_bench/auto_debugging/task.json") == (
        "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks/auto_debugging/task.json"
    )
    assert helm.source_url("big_bench/logical_deduction/three_objects/task.json").endswith(
        "benchmark_tasks/logical_deduction/three_objects/task.json"
    )
    assert helm.source_url("mmlu/data") == "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
    assert helm.source_url("bbq/data/Age") == "https://raw.githubusercontent.com/nyu-mll/BBQ/main/data/Age.jsonl"
    assert helm.source_url("something/else") is None


def test_offline_message_is_one_clear_message(tmp_path):
    failures = helm.find_download_failures(_log("offline_per_run_spec.log"))
    failures += [helm.DownloadFailure(f"mmlu:subject=s{i}", "mmlu", failures[0].error) for i in range(3)]
    log = tmp_path / "x-helm-run.log"
    message = helm.offline_message(failures, ["mmlu/data"], "http://127.0.0.1:8080/", log, tmp_path / "scenarios")
    assert message.startswith("error: HELM could not download the scenario datasets")
    assert "Traceback" not in message
    assert "not downloaded: scenarios/mmlu/data from https://people.eecs.berkeley.edu/~hendrycks/data.tar" in message
    assert "failed: 4 run specs, e.g. mmlu:subject=anatomy" in message  # grouped per scenario and error
    assert "HELM_HTTP_MODEL_BASE_URL=http://127.0.0.1:8080 " in message
    assert "internet access" in message and str(log) in message
    assert len(message.splitlines()) < 20


def test_install_failure_message_explains_python_311():
    message = helm.install_failure_message(
        "crfm-helm==0.4.0", Path(".venv-helm"), "pip install", 1, _log("pip_no_version.log"), Path("out/helm/install.log")
    )
    assert message.startswith("error: could not install crfm-helm==0.4.0 into .venv-helm (pip install exited 1).")
    assert "No matching distribution found for crfm-helm==0.4.0" in message
    assert "require Python < 3.11" in message and "out/helm/install.log" in message
    offline = "WARNING: Retrying ... Failed to establish a new connection: [Errno -2] Name or service not known\nERROR: No matching distribution found for crfm-helm==0.5.16\n"
    assert "PyPI could not be reached" in helm.install_failure_message("crfm-helm==0.5.16", Path("v"), "pip install", 1, offline, Path("l"))


# --- the flow, with stand-ins for HELM's commands ---------------------------------------------


def _fake_helm(tmp_path: Path, run_log: str, run_code: int) -> Path:
    """A venv whose helm-run prints ``run_log`` and exits ``run_code``; helm-summarize succeeds."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / helm.STAMP_NAME).write_text(f"crfm-helm=={helm.HELM_VERSION}\n")
    (tmp_path / "run.log").write_text(run_log)
    scripts = {
        "helm-run": f'#!/bin/sh\necho "url=$HELM_HTTP_MODEL_BASE_URL args=$*"\ncat "{tmp_path / "run.log"}"\nexit {run_code}\n',
        "helm-summarize": "#!/bin/sh\necho summarized\n",
    }
    for name, body in scripts.items():
        path = venv / "bin" / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return venv


def test_main_offline_exits_with_the_offline_message(tmp_path, capsys):
    venv = _fake_helm(tmp_path, _log("offline_full_conf.log"), 1)
    out = tmp_path / "out"
    lock = out / "benchmark_output" / "scenarios" / "big_bench" / "auto_debugging" / "task.json.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    with pytest.raises(SystemExit) as exc:
        helm.main(server_url="http://127.0.0.1:8080", suite="t", max_eval_instances=2, out_dir=out, venv=venv, skip_health_check=True)
    message = str(exc.value.code)
    assert message.startswith("error: HELM could not download the scenario datasets")
    assert "benchmark_tasks/auto_debugging/task.json" in message
    assert "[big_bench scenario]" in message
    assert "Traceback" not in capsys.readouterr().out
    run_log = (out / "t-helm-run.log").read_text()
    assert run_log.startswith("$ HELM_HTTP_MODEL_BASE_URL=http://127.0.0.1:8080 ")
    assert "url=http://127.0.0.1:8080 args=--conf-paths" in run_log
    assert "max_eval_instances=2" in (out / "t-run_specs.conf").read_text()
    assert not (out / "t-helm-summarize.log").exists()


def test_main_success_runs_summarize(tmp_path, capsys):
    venv = _fake_helm(tmp_path, _log("smoke_ok.log"), 0)
    out = tmp_path / "out"
    helm.main(suite="s", out_dir=out, venv=venv, smoke=True, skip_health_check=True)
    printed = capsys.readouterr().out
    assert "[helm] running simple_mcqa:model=neurips_local" in printed
    assert "nltk" in printed  # the warning is passed on, not fatal
    assert "done: results in" in printed
    assert "summarized" in (out / "s-helm-summarize.log").read_text()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--smoke", "true", "--conf", "my.conf"], "error: --conf: --smoke runs HELM's built-in simple_mcqa scenario, so my.conf would not be read"),
        (["--skip_health_check", "true", "--server_wait_s", "120"], "error: --server_wait_s: how long the server health check waits"),
    ],
)
def test_main_refuses_an_option_its_mode_skips(tmp_path, capsys, flags, expected):
    """Accepted, --smoke would run simple_mcqa whatever --conf said, and no check would wait --server_wait_s."""
    from core.cli import run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli(helm.main, args=["--out_dir", str(tmp_path / "out"), "--venv", str(tmp_path / "venv"), *flags])
    assert str(exc.value.code).startswith(expected)
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()  # refused before HELM is installed


def test_main_other_helm_failure_is_reported_without_offline_advice(tmp_path):
    venv = _fake_helm(tmp_path, "Traceback (most recent call last):\nValueError: bad conf: something\n", 1)
    with pytest.raises(SystemExit) as exc:
        helm.main(out_dir=tmp_path / "out", venv=venv, skip_health_check=True)
    message = str(exc.value.code)
    assert message.startswith("error: helm-run exited 1: ValueError: bad conf: something")
    assert "internet" not in message


def test_ensure_helm_is_idempotent(tmp_path, monkeypatch):
    venv = _fake_helm(tmp_path, "", 0)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("installed again")

    monkeypatch.setattr(helm.subprocess, "call", no_subprocess)
    helm.ensure_helm(venv, helm.HELM_VERSION, tmp_path / "install.log")
    assert not (tmp_path / "install.log").exists()


# --- the server check -------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status":"ready"}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_server_health_ok_and_refused():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        assert helm.server_health(f"http://127.0.0.1:{port}", wait_s=0).startswith("GET /health -> 200")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(SystemExit) as exc:
        helm.server_health(f"http://127.0.0.1:{port}", wait_s=0)
    assert "no server answers at http://127.0.0.1:" in str(exc.value.code)
    assert "make serve" in str(exc.value.code)


def test_cli_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "submission.helm", "--help"], cwd=helm.REPO_ROOT, capture_output=True, text=True, check=True).stdout
    for option in ("--server_url", "--suite", "--max_eval_instances", "--conf", "--venv", "--smoke"):
        assert option in out
