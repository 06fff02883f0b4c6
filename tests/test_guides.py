"""Every getting-started guide (docs/guides/*.md, discovered, not listed) is run as its reader would run it: each
command and code block in order, in a fresh copy of the example project with its own ONEPATH_HOME
(tests/guide_runner.py says the format). A guide that needs the running platform (a ``live`` block) runs whole
in the test tests/guide_runner.py LIVE_GUIDES names for it. The runner itself is shown to fail on a
wrong flag, a missing file, a refusal that is not one, and a guide off the format."""

from __future__ import annotations

import pytest

import importlib

from tests.guide_runner import (LIVE_GUIDES, GuideError, Session, discover, guide_env, not_run, parse, project_copy,
                                unrun_commands)

GUIDE_FILES = discover()


def test_there_are_guides_for_every_role():
    names = {g.name for g in GUIDE_FILES}
    assert {"data-scientist.md", "app-developer.md", "platform-engineer.md", "auditor.md"} <= names, names


@pytest.fixture()
def session(tmp_path):
    project = project_copy(tmp_path / "project")
    s = Session(project, guide_env(project, tmp_path / "home"))
    yield s
    s.close()


@pytest.mark.parametrize("guide", GUIDE_FILES, ids=[g.stem for g in GUIDE_FILES])
def test_guide_runs(guide, session):
    blocks = parse(guide)  # the format: a guide off it fails here, naming file and line
    assert any(b.runs for b in blocks), f"{guide.name}: nothing in it is run"
    if any(b.live for b in blocks):
        # a live test runs it whole, on its platform; LIVE_GUIDES must name that test, and the test must exist
        assert guide.name in LIVE_GUIDES, (f"{guide.name} has a live block: name the test that runs it in "
                                           f"tests/guide_runner.py LIVE_GUIDES")
        path, test = LIVE_GUIDES[guide.name].split("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, test, None)), f"LIVE_GUIDES names {LIVE_GUIDES[guide.name]}: no such test"
        return
    session.run_guide(guide)
    print(f"\n{guide.name}:\n{session.report()}")


def test_every_command_a_guide_names_is_run_by_a_test():
    # a command in prose or a ```text block is run by the guide's own blocks, or RUN_ELSEWHERE names the test
    # that runs it; the ones no test runs are listed there under "NOT RUN", and shown here
    unrun = [line for g in GUIDE_FILES for line in unrun_commands(g)]
    assert not unrun, ("commands the guides name that no test runs (run them in a console block, or list them "
                       "in tests/guide_runner.py RUN_ELSEWHERE with the test that runs them):\n" + "\n".join(unrun))
    print("\nnamed in the guides, run by no test (RUN_ELSEWHERE['NOT RUN']):\n  " + "\n  ".join(not_run()))


def test_a_command_in_prose_that_nothing_runs_fails_the_lint(tmp_path):
    text = ("# x\n\nThen `onepath rollback fraud --env prod` and:\n\n```text\n$ ./dev clean\n```\n\n"
            "```console\n$ onepath validate\n```\n\nas `onepath validate` says; `onepath up` starts it.\n")
    assert unrun_commands(_guide(tmp_path, text)) == ["broken.md:3: `onepath rollback fraud --env prod`",
                                                      "broken.md:6: `./dev clean`"]


# --------------------------------------------------------------------------------------------
# The runner can fail


def _guide(tmp_path, text: str):
    p = tmp_path / "broken.md"
    p.write_text(text)
    return p


def test_a_wrong_flag_fails_the_runner(tmp_path, session):
    guide = _guide(tmp_path, "# x\n\n```console\n$ onepath inventory --env prod --jsn\n```\n")
    with pytest.raises(GuideError, match=r"broken\.md:3: `onepath inventory --env prod --jsn` exited 2"):
        session.run_guide(guide)
    # and a refusal that is really a usage error is no refusal
    guide = _guide(tmp_path, "```console refused\n$ onepath validate --strictly\n```\n")
    with pytest.raises(GuideError, match="a usage error"):
        session.run_guide(guide)


def test_a_missing_file_fails_the_runner(tmp_path, session):
    guide = _guide(tmp_path, "```console\n$ onepath policy init --as pat --key assets/demo_identities/nobody.key\n```\n")
    with pytest.raises(GuideError, match=r"broken\.md:1: `onepath policy init"):
        session.run_guide(guide)


def test_a_command_that_does_not_exist_fails_the_runner(tmp_path, session):
    guide = _guide(tmp_path, "```console refused\n$ onepath no-such-verb\n```\n")
    with pytest.raises(GuideError, match="a usage error"):
        session.run_guide(guide)
    guide = _guide(tmp_path, "```console\n$ onepth status\n```\n")
    with pytest.raises(GuideError, match="exited 127"):
        session.run_guide(guide)


def test_a_refusal_that_succeeds_fails_the_runner(tmp_path, session):
    guide = _guide(tmp_path, "```console refused\n$ onepath audit verify\n```\n")
    with pytest.raises(GuideError, match="the guide says it is refused"):
        session.run_guide(guide)


def test_a_refusal_for_another_reason_fails_the_runner(tmp_path, session):
    # refused, but not for the reason the guide shows under the command
    refused = "```console refused\n$ onepath card churn\nonepath card: no model 'churn' is declared ...\n```\n"
    with pytest.raises(GuideError, match="refused for another reason than the guide shows"):
        session.run_guide(_guide(tmp_path, refused))  # churn is declared; it was never deployed
    session.run_guide(_guide(tmp_path, refused.replace("churn", "nosuch")))  # the reason shown: passes
    guide = _guide(tmp_path, "```console refused\n$ onepath card nosuch\n```\n")
    with pytest.raises(GuideError, match="needs what it prints \\(its reason\\) shown"):
        session.run_guide(guide)
    # a notebook refusal: NotebookError, but another one than the ```text block after it shows
    cell = ("```python refused\nimport onepath\nonepath.predict('no_such_model', [])\n```\n\n"
            "```text\nNotebookError: fraud: no test rows given: ...\n```\n")
    with pytest.raises(GuideError, match="refused for another reason than the guide shows"):
        session.run_guide(_guide(tmp_path, cell))
    with pytest.raises(GuideError, match="needs a ```text block after it"):
        session.run_guide(_guide(tmp_path, cell.split("\n\n")[0]))


def test_a_file_the_reader_writes_is_written_where_it_says(tmp_path, session):
    written = "```yaml file=notes/team.yaml\nteam: payments\n```\n\n"
    session.run_guide(_guide(tmp_path, written + "```console\n$ grep -qx 'team: payments' notes/team.yaml\n```\n"))
    with pytest.raises(GuideError, match=r"broken\.md:5: `grep -qx 'team: risk' notes/team.yaml` exited 1"):
        session.run_guide(_guide(tmp_path, written + "```console\n$ grep -qx 'team: risk' notes/team.yaml\n```\n"))


@pytest.mark.parametrize("text, says", [
    ("```bash\nonepath status\n```\n", r"broken\.md:1: a ```bash block"),
    ("```console\nonepath status\n```\n", r"broken\.md:1: a console block with no command"),
    ("```console refuse\n$ onepath status\n```\n", r"unknown word 'refuse'"),
    ("```yaml file=../outside.yaml\na: 1\n```\n", r"must be a path inside the project"),
    ("```console\n$ onepath status\n", r"never closed"),
])
def test_a_guide_off_the_format_fails(tmp_path, session, text, says):
    with pytest.raises(GuideError, match=says):
        session.run_guide(_guide(tmp_path, text))


def test_a_live_block_outside_the_live_run_fails(tmp_path, session):
    with pytest.raises(GuideError, match="a live block"):
        session.run_guide(_guide(tmp_path, "```console live\n$ onepath status\n```\n"))


def test_every_line_a_refusal_shows_must_be_printed_in_that_order(tmp_path, session):
    # every line shown is looked for, in order, the first of them as the first line printed (a header may come
    # before the reason: the guide shows both)
    cmd = "$ printf 'in force: #1\\nplatform key: k\\nthe file differs: nothing promotes\\n'; exit 1\n"
    session.run_guide(_guide(tmp_path, f"```console refused\n{cmd}in force: ...\n...\nthe file differs: ...\n```\n"))
    for wrong in ("in force: ...\nthe file matches: ...", "the file differs: ...\nin force: ...",
                  "the file differs: ..."):  # the reason, but not the first line printed
        with pytest.raises(GuideError, match="did not print"):
            session.run_guide(_guide(tmp_path, f"```console refused\n{cmd}{wrong}\n```\n"))
