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
from pipeline.stages.convert_decoder import ConvertConfig
from pipeline.stages.distill import DistillConfig
from pipeline.stages.evaluate import EvaluateConfig
from pipeline.stages.index import IndexConfig
from pipeline.stages.prepare_data import PrepareConfig
from pipeline.stages.pretrain_encoder import PretrainEncoderConfig
from pipeline.stages.teacher_logits import TeacherLogitsConfig
from pipeline.stages.train import TrainConfig
from pipeline.stages.warmup import WarmupConfig

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("cpu", "tiny", "gpu", "paper")
# params section -> the config it fills (every section a dvc stage reads, plus the hand-run ones)
SECTIONS = {
    "convert": ConvertConfig,
    "prepare_mlm": PrepareConfig,
    "prepare_warmup": PrepareConfig,
    "prepare": PrepareConfig,
    "pretrain_encoder": PretrainEncoderConfig,
    "warmup": WarmupConfig,
    "train": TrainConfig,
    "teacher_logits": TeacherLogitsConfig,
    "distill": DistillConfig,
    "evaluate_ppl": EvaluateConfig,
    "evaluate_ruler": EvaluateConfig,
    "evaluate_longbench": EvaluateConfig,
    "index": IndexConfig,
    "evaluate_qa": EvaluateConfig,
    "evaluate_icl": EvaluateConfig,
    "evaluate_ralm": EvaluateConfig,
    "evaluate": EvaluateConfig,
}
STAGES = ["convert", "prepare_mlm", "prepare_warmup", "prepare", "pretrain_encoder", "warmup", "train",
          "teacher_logits", "distill", "evaluate@ppl", "evaluate@ruler"]
DOWNSTREAM_OF_TRAIN = {"train", "evaluate@ppl", "evaluate@ruler"}


def _profile(name: str) -> Path:
    return ROOT / "params" / f"{name}.yaml"


def test_params_yaml_is_the_cpu_profile():
    # the committed default; after `cepe use-profile X` in a checkout, `cepe use-profile cpu` restores it
    assert (ROOT / "params.yaml").read_text() == _profile("cpu").read_text(), "params.yaml is not params/cpu.yaml"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads_into_every_stage_config(profile):
    params = read_params(_profile(profile))
    assert set(SECTIONS) <= set(params), f"{profile}: missing sections {set(SECTIONS) - set(params)}"
    for section, cls in SECTIONS.items():
        config = load_config(cls, section, _profile(profile))  # an unknown or mistyped key raises here
        assert getattr(config, "output", None) or section == "evaluate"
    assert isinstance(params["num_processes"], int) and params["num_processes"] >= 1


def test_a_wrong_key_in_a_profile_is_rejected(tmp_path):
    params = read_params(_profile("tiny"))
    params["train"]["lrr"] = 1e-4
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(TrainConfig, "train", bad)


def _model_dir(path: str) -> str:
    return path if path.endswith("/model") else path + "/model"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_wires_each_stage_to_the_outputs_it_reads(profile):
    """dvc.yaml's deps use the producing section's output; the consuming keys must name the same path."""
    p = read_params(_profile(profile))
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
    for section in ("evaluate_ppl", "evaluate_ruler", "evaluate_longbench", "evaluate_qa", "evaluate_icl", "evaluate_ralm"):
        assert _model_dir(p[section]["model"]) == p["train"]["output"] + "/model", section
        assert p[section]["tokenizer"] == decoder, section
    # ralm reads the index stage's output, cut with the evaluated model's tokenizer into encoder chunks
    assert p["evaluate_ralm"]["index"] == p["index"]["output"] and p["index"]["tokenizer"] == decoder
    assert p["index"]["passage_tokens"] <= p["evaluate_ralm"]["chunk_len"]
    assert p["prepare_mlm"]["layout"] == "mlm" and p["prepare_warmup"]["layout"] == "duplicate"
    # the teacher and the student must agree on the window split they were computed for
    for key in ("teacher_context_len", "decoder_len", "k", "temperature"):
        assert p["distill"][key] == p["teacher_logits"][key], key


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


def test_dvc_resolves_the_same_graph_under_every_profile(tmp_path):
    """Every `${...}` in dvc.yaml exists in every profile (a missing key would break `dvc repro`)."""
    pytest.importorskip("dvc")
    for rel in ("dvc.yaml", *(f"params/{p}.yaml" for p in PROFILES)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n    no_scm = true\n")
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *PROFILES], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert graphs == {p: sorted(STAGES) for p in PROFILES}


def test_the_commented_downstream_stages_resolve_when_enabled(tmp_path):
    """Uncommenting the index stage and the qa/icl/ralm entries (as the README says) gives a valid
    graph under every profile, evaluate@ralm depending on the index's output."""
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
        shutil.copy(_profile(p), tmp_path / "params" / f"{p}.yaml")
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
        params = read_params(_profile(profile))
        assert params["index"]["output"] in deps["evaluate@ralm"], profile
        assert params["evaluate_qa"]["data"] in deps["evaluate@qa"], profile


def test_use_profile_switches_params_yaml(tmp_path):
    from pipeline.stages.profiles import use_profile

    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "params.yaml").write_text("stale: true\n")
    use_profile("tiny", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == _profile("tiny").read_text()


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
    ppl = json.loads((repo / "reports/evaluate/ppl/metrics.json").read_text())["ppl"]
    assert set(ppl) == {"128", "192"} and ppl["192"]["cepe"]["ppl"] > 1
    plots = json.loads(_run([str(dvc), "plots", "show", "--json"], repo, env))
    assert "errors" not in plots and all(v and v[0]["content"]["data"]["values"] for v in plots["data"].values())

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
