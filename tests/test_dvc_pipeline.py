"""The DVC pipeline: profiles that load into every stage config, a graph wired by the same paths,
and (slow) the whole `dvc repro` on the tiny profile in a fresh copy of the repository: every
declared output exists, every metrics file parses, a second run does nothing, and one changed
param re-runs exactly the stages downstream of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, read_params
from pipeline.errors import CepeError
from pipeline.profiles import render, use_profile
from pipeline.stages import registry
from pipeline.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("cpu", "tiny", "gpu", "paper")
# params section -> the config it fills (every section a dvc stage reads, plus the hand-run ones)
SECTIONS = {section: stage.section_config(section) for stage in registry.STAGES
            for section in stage.sections + stage.hand_sections}
STAGES = [name for stage in registry.STAGES for name in stage.dvc_stages]  # as DVC addresses them
DOWNSTREAM_OF_TRAIN = {"train", "evaluate@ppl", "evaluate@ppl_long", "evaluate@ruler", "plots"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """Every profile's params.yaml (params/base.yaml + its overlay), as `cepe use-profile` writes it."""
    folder = tmp_path_factory.mktemp("profiles")
    for name in PROFILES:
        (folder / f"{name}.yaml").write_text(render(name, ROOT))
    return folder


def test_params_yaml_is_the_cpu_profile():
    # the committed default; after `cepe use-profile X` in a checkout, `cepe use-profile cpu` restores it
    assert (ROOT / "params.yaml").read_text() == render("cpu", ROOT), "params.yaml is not the generated cpu profile"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads_into_every_stage_config(profile, rendered):
    params = read_params(rendered / f"{profile}.yaml")
    assert set(SECTIONS) <= set(params), f"{profile}: missing sections {set(SECTIONS) - set(params)}"
    for section, cls in SECTIONS.items():
        config = load_config(cls, section, rendered / f"{profile}.yaml")  # an unknown or mistyped key raises here
        assert getattr(config, "output", None) or getattr(config, "output_dir", None) or section in ("evaluate", "generate", "serve", "results")
    assert isinstance(params["num_processes"], int) and params["num_processes"] >= 1


def test_a_wrong_key_in_a_profile_is_rejected(tmp_path, rendered):
    params = read_params(rendered / "tiny.yaml")
    params["train"]["lrr"] = 1e-4
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(TrainConfig, "train", bad)


def _model_dir(path: str) -> str:
    return path if path.endswith("/model") else path + "/model"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_wires_each_stage_to_the_outputs_it_reads(profile, rendered):
    """dvc.yaml's deps use the producing section's output; the consuming keys must name the same path."""
    p = read_params(rendered / f"{profile}.yaml")
    decoder = p["convert"]["output"]
    assert p["pretrain_encoder"]["data"] == p["prepare_mlm"]["output"]
    assert p["pretrain_encoder"]["decoder"] == decoder
    assert p["warmup"]["data"] == p["prepare_warmup"]["output"]
    assert p["warmup"]["decoder"] == decoder
    assert _model_dir(p["warmup"]["encoder"]) == p["pretrain_encoder"]["output"] + "/model"
    assert p["train"]["data"] == [p["prepare"]["output"]]
    assert _model_dir(p["train"]["model"]) == p["warmup"]["output"] + "/model"
    assert p["teacher_logits"]["data"] == p["prepare"]["output"]
    assert p["distill"]["data"] == [p["prepare"]["output"]]
    assert p["distill"]["logits"] == [p["teacher_logits"]["output"]]
    assert _model_dir(p["distill"]["model"]) == p["warmup"]["output"] + "/model"
    for section in ("evaluate_ppl", "evaluate_ppl_long", "evaluate_ruler", "evaluate_longbench", "evaluate_qa",
                    "evaluate_icl", "evaluate_ralm"):
        assert _model_dir(p[section]["model"]) == p["train"]["output"] + "/model", section
        assert p[section]["tokenizer"] == decoder, section
    # the plots stage's deps are these sections' outputs (dvc.yaml): its runs must be the same
    assert p["plots"]["runs"] == [p[k]["output"] for k in ("pretrain_encoder", "warmup", "train", "distill",
                                                           "evaluate_ppl", "evaluate_ruler")]
    # ralm reads the index stage's output, cut with the evaluated model's tokenizer into encoder chunks
    assert p["evaluate_ralm"]["index"] == p["index"]["output"] and p["index"]["tokenizer"] == decoder
    assert p["index"]["passage_tokens"] <= p["evaluate_ralm"]["chunk_len"]
    assert p["prepare_mlm"]["layout"] == "mlm" and p["prepare_warmup"]["layout"] == "duplicate"
    # the teacher and the student must agree on the window split they were computed for
    for key in ("teacher_context_len", "decoder_len", "k", "temperature"):
        assert p["distill"][key] == p["teacher_logits"][key], key


@pytest.mark.parametrize("profile", PROFILES)
def test_held_out_documents_never_reach_a_training_stage(profile, rendered):
    """The prepare sections split documents alike (a test document of one is a test document of
    all), and a held-out domain is held out by every prepare section that reads it."""
    from pipeline.data.sources import parse_source
    from pipeline.data.build import _in_corpus_dir, _source_domains

    p = read_params(rendered / f"{profile}.yaml")
    sections = ("prepare_mlm", "prepare_warmup", "prepare")
    assert len({json.dumps(p[s]["splits"], sort_keys=True) for s in sections}) == 1
    held = set().union(*(p[s]["heldout_sources"] for s in sections))
    for s in sections:
        if p[s]["source"] and all(str(x).startswith(("embedded", "{corpus_dir}")) for x in p[s]["source"]):
            domains = set().union(*(_source_domains(parse_source(_in_corpus_dir(x, p[s]["corpus_dir"]), "text", "id"))
                                    for x in p[s]["source"]))
            assert held & domains <= set(p[s]["heldout_sources"]), (s, held & domains)
    for section in ("evaluate_ppl", "evaluate_ppl_long"):
        data = p[section]["data"]
        if data.startswith(p["prepare"]["output"] + "/documents/"):
            assert data.split("/")[-1].split(".")[0] in p["prepare"]["export_documents"], section


def test_every_dvc_stage_reads_its_own_section():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = dvc["stages"]
    for name, stage in stages.items():
        if "foreach" in stage:
            for key, item in stage["foreach"].items():
                assert item["section"] == f"evaluate_{key}" and item["cfg"] == "${evaluate_%s}" % key
            assert stage["do"]["params"] == ["${item.section}"]
            assert "--section ${item.section}" in stage["do"]["cmd"]
            continue
        assert stage["params"] == [name], name
        assert f"--section {name}" in stage["cmd"], name
        if "checkpoints" in json.dumps(stage.get("outs")):
            assert "--resume auto" in stage["cmd"], name


RESOLVE = """
import json, shutil, sys
from dvc.repo import Repo
out = {}
for profile in sys.argv[1:]:
    shutil.copy(f"params/{profile}.yaml", "params.yaml")
    with Repo(".") as repo:
        out[profile] = sorted(s.addressing for s in repo.index.stages)
print(json.dumps(out))
"""


def test_dvc_resolves_the_same_graph_under_every_profile(tmp_path, rendered):
    """Every `${...}` in dvc.yaml exists in every profile (a missing key would break `dvc repro`)."""
    pytest.importorskip("dvc")
    (tmp_path / "params").mkdir()
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    for p in PROFILES:  # the script below copies params/<profile>.yaml over params.yaml: the merged ones
        shutil.copy(rendered / f"{p}.yaml", tmp_path / "params" / f"{p}.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n    no_scm = true\n")
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *PROFILES], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert graphs == {p: sorted(STAGES) for p in PROFILES}


def test_the_commented_downstream_stages_resolve_when_enabled(tmp_path, rendered):
    """Uncommenting the index stage and the qa/icl/ralm entries (as the README says) gives a valid
    graph under every profile."""
    pytest.importorskip("dvc")
    text = (ROOT / "dvc.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("  # index:")
    for i in range(start, lines.index("  evaluate:")):
        lines[i] = lines[i].replace("  # ", "  ", 1) if lines[i].startswith("  # ") else lines[i]
    enabled = "\n".join(lines) + "\n"
    for task in ("qa", "icl", "ralm"):
        enabled = enabled.replace(f"      # {task}: {{", f"      {task}: {{")
    (tmp_path / "dvc.yaml").write_text(enabled)
    (tmp_path / "params").mkdir()
    for p in PROFILES:
        shutil.copy(rendered / f"{p}.yaml", tmp_path / "params" / f"{p}.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n    no_scm = true\n")
    script = RESOLVE.replace("sorted(s.addressing for s in repo.index.stages)",
                             "sorted((s.addressing, sorted(d.def_path for d in s.deps)) for s in repo.index.stages)")
    proc = subprocess.run([sys.executable, "-c", script, *PROFILES], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])
    for profile, stages in graphs.items():
        deps = {name: d for name, d in stages}
        assert set(deps) == set(STAGES) | {"index", "evaluate@qa", "evaluate@icl", "evaluate@ralm"}, profile


def test_use_profile_switches_params_yaml(tmp_path, rendered):
    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "params.yaml").write_text("stale: true\n")
    use_profile("tiny", tmp_path, force=True)
    assert (tmp_path / "params.yaml").read_text() == (rendered / "tiny.yaml").read_text()
    assert (tmp_path / "params.yaml").read_text().startswith("# params.yaml: made by `cepe use-profile tiny` from "
                                                             "params/base.yaml + params/tiny.yaml.")
    use_profile("gpu", tmp_path)  # one profile's output is replaced by another's without --force
    assert (tmp_path / "params.yaml").read_text() == (rendered / "gpu.yaml").read_text()


def test_use_profile_keeps_a_hand_edited_params_yaml_without_force(tmp_path):
    shutil.copytree(ROOT / "params", tmp_path / "params")
    use_profile("cpu", tmp_path)
    edited = (tmp_path / "params.yaml").read_text().replace("  max_steps: ", "  max_steps: 1", 1)
    (tmp_path / "params.yaml").write_text(edited)
    with pytest.raises(CepeError) as err:
        use_profile("tiny", tmp_path)
    assert str(err.value) == (f"{tmp_path / 'params.yaml'}: differs from what every profile generates (edited by hand?); "
                              "`cepe use-profile tiny --force` overwrites it")
    assert (tmp_path / "params.yaml").read_text() == edited  # nothing lost
    use_profile("tiny", tmp_path, force=True)
    assert (tmp_path / "params.yaml").read_text() == render("tiny", tmp_path)


def test_an_overlay_key_missing_from_base_is_refused(tmp_path):
    shutil.copytree(ROOT / "params", tmp_path / "params")
    overlay = tmp_path / "params" / "tiny.yaml"
    overlay.write_text(overlay.read_text().replace("\ntrain:\n", "\ntrain:\n  new_knob: 3\n"))
    with pytest.raises(CepeError, match=r"tiny\.yaml: train\.new_knob is not in .*base\.yaml \(add every key to base\.yaml first"):
        use_profile("tiny", tmp_path)
    assert not (tmp_path / "params.yaml").exists()
    overlay.write_text(overlay.read_text() + "\ntrain:\n  lr: 1.0\n")  # a second train section
    with pytest.raises(CepeError, match=r"tiny\.yaml line \d+: section train appears twice"):
        use_profile("tiny", tmp_path)


def test_base_holds_every_key_each_section_reads():
    import dataclasses

    base = read_params(ROOT / "params" / "base.yaml")
    for stage in registry.STAGES:
        for section in stage.sections + stage.hand_sections:
            assert section in base, f"params/base.yaml: no section {section} ({stage.command} reads it)"
            values = base[section]
            unread = stage.unread_keys(section, values)
            missing = {f.name for f in dataclasses.fields(stage.section_config(section))} - unread - set(values)
            assert not missing, f"params/base.yaml: section {section} lacks {sorted(missing)}"
            assert not unread & set(values), f"params/base.yaml: section {section} shows keys it never reads"
    # the rule bites: a section without one of its keys, or showing one its task ignores, is caught
    evaluate = registry.by_command("evaluate")
    assert "lengths" in evaluate.unread_keys("evaluate_ruler", {"task": "ruler"})
    assert not evaluate.unread_keys("evaluate", {"task": "ruler"})  # the hand-run section keeps all keys
    assert "ruler_lengths" not in evaluate.unread_keys("evaluate_ruler", {"task": "ruler"})


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if not str(d).startswith("${")}


def test_dvc_code_deps_are_the_registrys():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = set()
    for name, stage in dvc["stages"].items():
        body = stage["do"] if "foreach" in stage else stage
        entry = registry.by_dvc_stage(name)
        declared.add(entry.command)
        assert _code_deps(body) == set(entry.code_deps()), f"dvc.yaml stage {name}: code deps differ from the registry's"
        for dep in entry.code_deps():
            assert (ROOT / dep).exists(), f"registry: {entry.command} depends on {dep}, which does not exist"
    assert declared == {s.command for s in registry.STAGES if s.dvc_stages}, "a registered stage has no dvc.yaml entry"


def _imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return {n for n in names if n.split(".")[0] in ("pipeline", "cepe_cli")}


def _module_file(name: str) -> Path | None:
    for path in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _closure(module: str) -> set[str]:
    """Every file of this repository a module imports, directly or not (function-level imports too)."""
    seen: set[Path] = set()
    todo = [_module_file(module)]
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            todo += [_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return {str(p.relative_to(ROOT)) for p in seen}


def test_each_stage_imports_only_the_code_dvc_tracks_for_it():
    """A stage module reaching code outside its declared deps would not re-run when that code
    changes; a stage importing another stage is the same mistake (stages call library code)."""
    for stage in registry.STAGES:
        deps = stage.code_deps()
        for path in sorted(_closure(stage.module)):
            if path.endswith("__init__.py"):  # a package's face: its files are checked themselves
                continue
            assert path == stage.module_path() or not path.startswith("pipeline/stages/"), \
                f"{stage.module_path()} imports another stage, {path}"
            assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps), \
                f"{stage.command}: imports {path}, which its dvc deps (pipeline/stages/registry.py) do not cover"
        cli = _closure(stage.cli)
        for path in sorted(p for p in cli if p.startswith("cepe_cli/") and not p.endswith(("__init__.py", "options.py"))):
            assert path in deps, f"{stage.cli}: runs {path}, which its dvc deps do not list"


def test_every_stage_has_its_command_config_and_run():
    import importlib

    for stage in registry.STAGES:
        cli = importlib.import_module(stage.cli)
        assert hasattr(cli, "command_" + stage.command.replace("-", "_")), stage.command
        assert dataclasses_fields(stage.config_class()), stage.config
        assert callable(stage.run_function()), stage.module


def dataclasses_fields(cls: type) -> tuple:
    import dataclasses

    return dataclasses.fields(cls)


def test_overlays_hold_only_what_differs_from_base():
    base = read_params(ROOT / "params" / "base.yaml")
    for name in PROFILES:
        overlay = read_params(ROOT / "params" / f"{name}.yaml")
        for section, values in overlay.items():
            if isinstance(values, dict):
                same = [k for k, v in values.items() if base[section][k] == v]
            else:
                same = [section] if base[section] == values else []
            assert not same, f"params/{name}.yaml repeats base.yaml's value of {section}: {same}"


# --- the whole pipeline ----------------------------------------------------------------------


def _repo_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is needed (to list the repository's files and for dvc exp)")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the repository's files from build outputs")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


DECLARED = """
import json
from dvc.repo import Repo
with Repo(".") as repo:
    print(json.dumps([{"stage": s.addressing, "path": o.def_path, "metric": bool(o.metric),
                       "cache": o.use_cache, "persist": o.persist} for s in repo.index.stages for o in s.outs]))
"""


@pytest.mark.slow
def test_dvc_repro_runs_the_tiny_profile_end_to_end_then_only_what_a_param_reaches(tmp_path):
    bindir = Path(sys.executable).parent
    dvc = bindir / "dvc"
    if not dvc.exists() or not (bindir / "cepe").exists():
        pytest.skip("dvc and cepe must be installed next to the test's Python")
    repo = tmp_path / "repo"
    for rel in _repo_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "GIT_AUTHOR_NAME": "cepe-test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "cepe-test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "config", "user.name", "cepe-test"], repo, env)
    _run(["git", "config", "user.email", "test@example.invalid"], repo, env)
    _run([str(bindir / "cepe"), "use-profile", "tiny"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "tiny profile"], repo, env)

    first = _run([str(dvc), "repro"], repo, env)
    assert _ran(first) == set(STAGES), first[-2000:]

    declared = json.loads(_run([str(bindir / "python"), "-c", DECLARED], repo, env).strip().splitlines()[-1])
    assert {d["stage"] for d in declared} == set(STAGES)
    for out in declared:
        path = repo / out["path"]
        assert path.exists(), f"{out['stage']}: declared output {out['path']} is missing"
        if out["metric"]:
            assert isinstance(json.loads(path.read_text()), dict), out["path"]
        if path.name == "checkpoints":
            assert out["persist"] and not out["cache"], out
    metrics = json.loads(_run([str(dvc), "metrics", "show", "--json"], repo, env))
    # keyed by revision: "workspace", or the commit when the workspace matches it (dvc 3.x)
    (revision,) = metrics.values()
    files = revision["data"]
    assert len(files) == sum(d["metric"] for d in declared) and all("error" not in v for v in files.values())
    assert json.loads((repo / "runs/train/metrics.json").read_text())["steps"] == 2
    warm = json.loads((repo / "runs/warmup/metrics.json").read_text())
    assert warm["stopped_by"] == "max_time_s" and 1 <= warm["steps"] < warm["max_steps"], warm
    assert warm["decoder_tokens_per_s"] > 0 and warm["encoder_tokens_per_s"] > 0 and warm["flops_per_step"] > 0
    evaluated = json.loads((repo / "reports/evaluate/ppl/metrics.json").read_text())
    ppl = evaluated["ppl"]
    assert set(ppl) == {"128", "192"} and ppl["192"]["cepe"]["ppl"] > 1
    # the controls read prepare's held-out documents: the held-out KJV and the ABS guide's test documents
    assert evaluated["heldout_sources"] == ["bible"]
    for length in ("128", "192"):
        assert ppl[length]["other-document"]["n_windows"] > 0 and ppl[length]["other-source"]["n_windows"] > 0
        assert evaluated["differences"][length]["other-document"]["nll_ci"] is not None
        assert evaluated["context_use"][length]["n_windows"] > 0
    long = json.loads((repo / "reports/evaluate/ppl_long/metrics.json").read_text())["ppl"]
    assert set(long) == {"128", "192", "256"} and all(long[k]["other-document"]["n_windows"] for k in long)
    # `cepe results` gathers the run's own outputs (no log here: no stage times)
    _run([str(bindir / "cepe"), "results", "--log", "", "--output-dir", "results"], repo, env)
    summary = json.loads((repo / "results/pipeline_tiny.json").read_text())
    assert summary["ppl"]["192"]["cepe"] == ppl["192"]["cepe"]["ppl"]
    assert summary["warmup_loss_first"] == warm["loss_first"] and summary["steps"]["warmup"]["stopped_by"] == "max_time_s"
    fidelity = json.loads((repo / "results/fidelity.json").read_text())
    assert fidelity["heldout_source"]["name"] == "bible" and set(fidelity["ppl_by_context"]) == {"64", "128", "192"}
    assert fidelity["context_use_2k"]["value"] == evaluated["context_use"]["128"]["value"]
    plots = json.loads(_run([str(dvc), "plots", "show", "--json"], repo, env))
    # images only (the plots stage's SVGs): the page dvc writes loads nothing from a CDN
    assert "errors" not in plots and len(plots["data"]) == 5
    assert all(v and v[0]["type"] == "image" and Path(v[0]["url"]).is_file() for v in plots["data"].values())
    _run([str(dvc), "plots", "show"], repo, env)
    assert "cdn" not in (repo / "dvc_plots" / "index.html").read_text().lower()

    second = _run([str(dvc), "repro"], repo, env)
    assert _ran(second) == set() and "didn't change" in second
    assert json.loads(_run([str(dvc), "status", "--json"], repo, env)) == {}

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "ran"], repo, env)
    changed = _run([str(dvc), "exp", "run", "-S", "train.lr=1e-4"], repo, env)
    assert _ran(changed) == DOWNSTREAM_OF_TRAIN, changed[-2000:]
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == pytest.approx(1e-4)
    diff = json.loads(_run([str(dvc), "params", "diff", "--json"], repo, env))["params.yaml"]
    assert list(diff) == ["train.lr"] and diff["train.lr"]["new"] == pytest.approx(1e-4)
    assert json.loads(_run([str(dvc), "status", "--json"], repo, env)) == {}
