"""README.md stays true to the code: every section the code cites ("README: X") exists, every name
in the concept table exists, the set-up section's test command is the one CI runs, and the part
before the measured studies stays a one-sitting read."""
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HEADINGS = [line.lstrip("#").strip() for line in README.splitlines() if line.startswith("#")]


def test_every_section_the_code_cites_exists():
    files = [*ROOT.glob("*.py"), *ROOT.glob("assets/*.py"), *ROOT.glob("tests/*.py")]
    cited = {(f.name, name.strip()) for f in files if f.name != "test_readme.py"
             for match in re.finditer(r"README: ([^)\"\n]+)", f.read_text())
             for name in match[1].split(", ") if name != "X"}   # "X": elf.py's convention
    assert len(cited) > 20
    for file, name in sorted(cited):
        assert any(h.startswith(name) for h in HEADINGS), f"{file} cites README: {name}"


def test_every_name_in_the_concept_table_exists():
    table = README.split("## Where each idea lives")[1].split("\n## ")[0]
    names = set(re.findall(r"`((?:elf|train|sample|prepare_data)(?:\.\w+)+)`", table))
    assert len(names) > 60
    for name in sorted(names):
        module, *path = name.split(".")
        thing = importlib.import_module(module)
        for attribute in path:
            assert hasattr(thing, attribute), f"README names {name}, which does not exist"
            thing = getattr(thing, attribute)


def test_the_set_up_section_shows_install_run_and_the_test_command_ci_runs():
    setup = README.split("## Set-up: install, run, test")[1].split("\n## ")[0]
    commands = re.search(r"```bash\n(.*?)```", setup, re.S)[1].splitlines()
    assert [c.split("#")[1].split()[0] for c in commands] == ["install", "run:", "test"]
    test_command = commands[2].split("#")[0].strip()
    assert test_command == "python -m pytest -q"
    assert (ROOT / ".ci/run").read_text().rstrip().endswith(test_command)
    assert re.search(r"The suite takes about \d+ minutes", setup)


def test_the_method_comes_before_the_studies_and_the_read_is_short():
    before, appendix = README.split("## Appendix: measured studies")
    order = ["What ELF is", "Set-up", "A first run", "The flow", "Embeddings", "The network",
             "Training objective", "Self-conditioning", "Sampling", "Conditions", "Judging",
             "On a GPU", "Never losing work", "Options", "Performance", "Where each idea lives",
             "Ablations"]
    places = [before.index("\n## " + title) for title in order]
    assert places == sorted(places)
    assert len(before.split()) <= 5000
    assert "\n## " not in appendix                       # one appendix, at the end
