"""The README's two fresh-machine commands are the ones CI runs, and what they name exists."""
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_them():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    for c in commands:
        assert c in ci, f"CI does not run the README command: {c}"
    assert "pytest" in commands[1] and "[test]" in commands[1]


def test_main_job_entry_points_exist():
    main_job = _readme_commands()[0]
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert '"dcgmm = dcgmm_fast.cli:main"' in setup  # the console script the command calls
    from dcgmm_fast import cli

    parser = cli.build_parser()
    for call in re.findall(r"\.venv/bin/dcgmm ([^&]+)", main_job):
        args = parser.parse_args(call.split())  # every call of the main job parses
        assert callable(args.func)
    assert "dcgmm train --preset demo" in main_job and "dcgmm sample" in main_job


def test_no_exact_torch_pin_in_install_requires():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert '"torch>=2.11"' in setup and "torch==" not in setup.split("install_requires", 1)[1].split("]", 1)[0]


def test_readme_python_example_runs():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)\n```", text, flags=re.S)
    assert blocks
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["mu"].grad is not None and scope["mu"].grad.shape == (25, 9)
    assert scope["back"].shape == scope["x"].shape


def test_readme_model_and_sampling_examples_run(monkeypatch, tmp_path):
    from dcgmm_fast import data

    small = data.load_shipped()
    small = small._replace(x_train=small.x_train[:200], y_train=small.y_train[:200], x_test=small.x_test[:20],
                           y_test=small.y_test[:20])
    monkeypatch.setattr(data, "load_shipped", lambda path=None: small)
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)\n```", text, flags=re.S)
    scope = {}
    monkeypatch.chdir(tmp_path)  # the example saves demo.pt
    exec(compile(blocks[1], "README.md", "exec"), scope)  # the model: builds `model` and `ds`, trains 1 epoch
    assert scope["history"].steps == 2
    exec(compile(blocks[2], "README.md", "exec"), scope)  # sampling and inference on it
    assert scope["completed"].shape == (8, 28, 28, 1) and scope["shirts"].shape == (16, 28, 28, 1)


def test_readme_links_the_results_page_and_its_files_exist():
    """The README links docs/results.md and shows a figure from it; every local link and image of the README and
    of the results page names a committed file."""
    text = open(os.path.join(ROOT, "README.md")).read()
    assert "](docs/results.md)" in text and "![" in text.split("## Results", 1)[1].split("\n## ", 1)[0]
    docs = [(os.path.join(ROOT, "docs"), open(os.path.join(ROOT, "docs", name)).read())
            for name in ("results.md", "getting-started.md", "configuration.md", "api.md")]
    for base, doc in [(ROOT, text)] + docs:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc):
            if "://" not in target:
                assert os.path.exists(os.path.join(base, target)), target


def test_api_reference_is_current():
    """docs/api.md is what tools/make_api_docs.py writes from today's docstrings (no network)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_api_docs.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
