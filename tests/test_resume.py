"""Resume only the same run (issue 7, defect 5) and the kill-and-resume guarantee of `scripts/distill.py`."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import script_env, tiny_bert_config, write_tiny_tsv
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from hf_distill import (
    DataArguments,
    DistillationConfig,
    ModelArguments,
    prepare_output_dir,
    run_settings,
    setting_defaults,
)
from hf_distill.resume import RUN_CONFIG_NAME, diff_settings, is_complete_checkpoint, write_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "distill.py")
RECIPE = os.path.join(REPO, "recipes", "bert-base-sst2_to_bert-6l", "distilbert.yaml")
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

# Run by the killed subprocesses instead of `python scripts/distill.py`: it runs the real script, but first makes
# `Trainer` stop (sleep) at a chosen point and say so in a marker file, so that the test SIGKILLs it exactly there.
KILL_LAUNCHER = """
import os, runpy, sys, time
import transformers

def hold(marker):
    open(marker, "w").close()
    time.sleep(600)  # the test SIGKILLs the process while it waits here

step, marker = int(os.environ.get("KILL_AT_STEP", -1)), os.environ.get("KILL_MARKER")
save_step = int(os.environ.get("KILL_WHILE_SAVING_STEP", -1))
train_step, save_rng = transformers.Trainer.training_step, transformers.Trainer._save_rng_state

def training_step(self, *args, **kwargs):
    if self.state.global_step == step:  # `step` optimizer steps done: mid-epoch, between two checkpoints
        hold(marker)
    return train_step(self, *args, **kwargs)

def _save_rng_state(self, output_dir):
    if self.state.global_step == save_step:  # weights, optimizer and projections written, trainer_state.json not
        hold(marker)
    return save_rng(self, output_dir)

transformers.Trainer.training_step, transformers.Trainer._save_rng_state = training_step, _save_rng_state
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer):
    """A tiny teacher (with its tokenizer), a narrower student (so projections are learned) and a 48-row TSV."""
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_layers=4, hidden=32, **NO_DROPOUT)).save_pretrained(
        root / "teacher"
    )
    tiny_tokenizer.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2, hidden=16, **NO_DROPOUT))
    student.save_pretrained(root / "narrow_student")
    g = torch.Generator().manual_seed(0)
    write_tiny_tsv(root / "train.tsv", 48, g)
    (root / "kill_launcher.py").write_text(KILL_LAUNCHER)
    return root


def script_args(root, out, *extra) -> list[str]:
    """48 rows, batch 8: 6 steps per epoch; 10 steps cross an epoch boundary; a checkpoint every 2 steps."""
    return [
        "--config",
        RECIPE,
        "--teacher_model_name_or_path",
        str(root / "teacher"),
        "--student_model_name_or_path",
        str(root / "narrow_student"),
        "--train_file",
        str(root / "train.tsv"),
        "--max_length",
        "16",
        "--output_dir",
        str(out),
        "--max_steps",
        "10",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--attention_weight",
        "1.0",
        "--embeddings_weight",
        "1.0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--seed",
        "0",
        "--use_cpu",
        "true",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def run_script(root, out, *extra, timeout=600):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *script_args(root, out, *extra)],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


def run_and_kill(root, out, marker_name: str, **kill_env) -> None:
    """Start the script, wait until it holds at the chosen point, SIGKILL it."""
    marker = root / marker_name
    proc = subprocess.Popen(
        [sys.executable, str(root / "kill_launcher.py"), SCRIPT, *script_args(root, out)],
        env=script_env(KILL_MARKER=str(marker), **{k: str(v) for k, v in kill_env.items()}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill point:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def final_tensors(out) -> tuple[dict, dict]:
    student = load_file(str(out / "student" / "model.safetensors"))
    projections = torch.load(out / "checkpoint-10" / "projections.pt", weights_only=True)
    return student, projections


def assert_no_half_written_student(out) -> None:
    assert not (out / "student").exists() and not (out / "student.tmp").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(workdir, tmp_path):
    """SIGKILL a real run twice (once while it saves a checkpoint, once mid-epoch), resume, compare bitwise."""
    reference = tmp_path / "uninterrupted"
    proc = run_script(workdir, reference)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "killed"
    # Killed while writing checkpoint-4 (epoch 1): it holds weights, optimizer and projections but no trainer state.
    run_and_kill(workdir, out, "kill1", KILL_WHILE_SAVING_STEP=4)
    assert is_complete_checkpoint(str(out / "checkpoint-2")) and not is_complete_checkpoint(str(out / "checkpoint-4"))
    assert_no_half_written_student(out)
    # Resumed from checkpoint-2 (the incomplete checkpoint-4 is deleted), then killed after 9 steps: mid-epoch 2,
    # one step after checkpoint-8.
    run_and_kill(workdir, out, "kill2", KILL_AT_STEP=9)
    assert is_complete_checkpoint(str(out / "checkpoint-8"))
    assert_no_half_written_student(out)
    proc = run_script(workdir, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr and "checkpoint-8" in proc.stderr

    student, projections = final_tensors(out)
    ref_student, ref_projections = final_tensors(reference)
    assert student.keys() == ref_student.keys() and projections.keys() == ref_projections.keys()
    assert len(projections) > 1  # the narrow student learns projections, which must be restored too
    for name in ref_student:
        assert torch.equal(student[name], ref_student[name]), name
    for name in ref_projections:
        if isinstance(ref_projections[name], torch.Tensor):
            assert torch.equal(projections[name], ref_projections[name]), name
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    ref_state = json.loads((reference / "checkpoint-10" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-2:] == [e["loss"] for e in ref_state["log_history"] if "loss" in e][-2:]
    assert not (out / "student.tmp").exists()


def load_script():
    spec = importlib.util.spec_from_file_location("distill_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_different_run_is_refused_instead_of_resumed(workdir, tmp_path, monkeypatch):
    """Defect 5: another loss, temperature and learning rate in the same output_dir used to train 0 steps."""
    monkeypatch.setenv("WANDB_DISABLED", "true")
    distill = load_script()
    out = tmp_path / "run"
    short = ["--max_steps", "2"]
    distill.main(script_args(workdir, out, *short))
    card = (out / "student" / "README.md").read_bytes()
    other = ["--logits_loss", "mse", "--temperature", "4.0", "--learning_rate", "5e-4"]
    with pytest.raises(ValueError, match="refusing to resume") as e:
        distill.main(script_args(workdir, out, *short, *other))
    message = str(e.value)
    for line in ("learning_rate: 0.001 -> 0.0005", "logits_loss: 'kl' -> 'mse'", "temperature: 2.0 -> 4.0"):
        assert line in message
    assert "--overwrite_output_dir true" in message and "--output_dir" in message
    assert (out / "student" / "README.md").read_bytes() == card  # nothing of the refused run was written
    assert (out / "checkpoint-2" / RUN_CONFIG_NAME).is_file() and (out / RUN_CONFIG_NAME).is_file()

    # The same settings resume (0 steps left); --overwrite_output_dir starts over with the new settings.
    distill.main(script_args(workdir, out, *short, "--resume", "auto"))
    distill.main(script_args(workdir, out, *short, *other, "--overwrite_output_dir", "true"))
    recorded = json.loads((out / RUN_CONFIG_NAME).read_text())["settings"]
    assert recorded["temperature"] == 4.0 and recorded["logits_loss"] == "mse"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["loss"] for e in state["log_history"] if "loss" in e] and state["global_step"] == 2


# ---------------------------------------------------------------------------------------------- prepare_output_dir
def settings_of(**training) -> dict:
    return run_settings(
        ModelArguments(teacher_model_name_or_path="t"),
        DataArguments(train_file="train.tsv"),
        DistillationConfig(output_dir="unused", report_to="none", **training),
        train_rows=48,
    )


def fake_checkpoint(out, step: int, settings: dict | None, complete: bool = True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if settings is not None:
        write_run_config(str(path), settings)
    return path


def test_settings_leave_out_secrets_and_what_cannot_change_the_weights():
    settings = settings_of(hub_token="hf_secret123", logging_steps=7, save_steps=3, learning_rate=2e-5)
    assert settings["learning_rate"] == 2e-5 and settings["train_rows"] == 48 and settings["temperature"] == 2.0
    for name in ("hub_token", "logging_steps", "save_steps", "output_dir", "report_to", "dataloader_num_workers"):
        assert name not in settings
    assert "hf_secret123" not in json.dumps(settings)
    # Logging and saving differently is the same run; another learning rate is not.
    assert settings == settings_of(logging_steps=100, save_steps=50, learning_rate=2e-5)
    assert settings != settings_of(learning_rate=3e-5)


def test_resume_auto_picks_the_last_complete_checkpoint_and_deletes_incomplete_ones(tmp_path):
    settings = settings_of()
    fake_checkpoint(tmp_path, 2, settings)
    fake_checkpoint(tmp_path, 4, settings)
    fake_checkpoint(tmp_path, 6, None, complete=False)  # killed while saving
    assert prepare_output_dir(str(tmp_path), settings) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists() and (tmp_path / RUN_CONFIG_NAME).is_file()


def test_resume_auto_refuses_other_settings_and_leaves_the_folder_alone(tmp_path):
    fake_checkpoint(tmp_path, 2, settings_of(temperature=2.0))
    fake_checkpoint(tmp_path, 4, None, complete=False)
    with pytest.raises(ValueError, match=r"(?s)refusing to resume.*temperature: 2.0 -> 3.0.*--resume never"):
        prepare_output_dir(str(tmp_path), settings_of(temperature=3.0))
    assert (tmp_path / "checkpoint-4").exists() and not (tmp_path / RUN_CONFIG_NAME).exists()


def test_checkpoint_without_a_record_is_not_resumed(tmp_path):
    fake_checkpoint(tmp_path, 2, None)
    with pytest.raises(ValueError, match="has no readable run_config.json"):
        prepare_output_dir(str(tmp_path), settings_of())


def test_resume_never_refuses_a_folder_with_checkpoints_and_overwrite_starts_over(tmp_path):
    settings = settings_of()
    fake_checkpoint(tmp_path, 2, settings)
    (tmp_path / "student").mkdir()
    with pytest.raises(ValueError, match=r"resume=.never. but output_dir=.* holds checkpoints \(checkpoint-2\)"):
        prepare_output_dir(str(tmp_path), settings, resume="never")
    other = settings_of(temperature=5.0)
    assert prepare_output_dir(str(tmp_path), other, resume="never", overwrite_output_dir=True) is None
    assert not (tmp_path / "checkpoint-2").exists() and not (tmp_path / "student").exists()
    assert json.loads((tmp_path / RUN_CONFIG_NAME).read_text())["settings"] == other


def test_explicit_resume_from_checkpoint_is_checked_too(tmp_path):
    elsewhere = tmp_path / "old_run"
    checkpoint = fake_checkpoint(elsewhere, 8, settings_of(learning_rate=1e-4))
    out = str(tmp_path / "new_run")
    with pytest.raises(ValueError, match="learning_rate: 0.0001 -> 5e-05"):
        prepare_output_dir(out, settings_of(), resume_from_checkpoint=str(checkpoint))
    assert prepare_output_dir(out, settings_of(learning_rate=1e-4), resume_from_checkpoint=str(checkpoint)) == str(
        checkpoint
    )
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=.*nope.* does not exist"):
        prepare_output_dir(out, settings_of(), resume_from_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="asks to resume but overwrite_output_dir=true"):
        prepare_output_dir(out, settings_of(), resume_from_checkpoint=str(checkpoint), overwrite_output_dir=True)


def test_local_model_paths_of_the_settings_are_absolute(tmp_path, monkeypatch):
    """A relative teacher adapter folder is recorded absolute, like the teacher's: a resume from another working
    directory compares the same folder, not the same text."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "adapter").mkdir()
    settings = run_settings(
        ModelArguments(teacher_model_name_or_path="teacher", teacher_adapter_name_or_path="adapter"),
        DataArguments(train_file="train.tsv"),
    )
    assert settings["teacher_model_name_or_path"] == str(tmp_path / "teacher")
    assert settings["teacher_adapter_name_or_path"] == str(tmp_path / "adapter")


def test_a_field_added_since_the_checkpoint_blocks_resuming_only_when_it_is_not_at_its_default(tmp_path):
    """A checkpoint recorded before a field existed (here: `ema_teacher`, `ema_decay`) resumes when this run leaves
    the field at its default (the behaviour the run had without it), and is refused when this run sets it."""
    objects = (
        ModelArguments(teacher_model_name_or_path="t"),
        DataArguments(train_file="train.tsv"),
        DistillationConfig(output_dir="unused", report_to="none"),
    )
    defaults = setting_defaults(*objects)
    assert defaults["ema_teacher"] is False and defaults["temperature"] == 2.0 and "output_dir" not in defaults
    assert defaults["lr_scheduler_type"] == "linear"  # enums as the settings record them
    old = {k: v for k, v in settings_of().items() if not k.startswith("ema_")}
    fake_checkpoint(tmp_path, 2, old)
    assert prepare_output_dir(str(tmp_path), settings_of(), defaults=defaults) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"ema_teacher: '<not set>' -> True"):
        prepare_output_dir(str(tmp_path), settings_of(ema_teacher=True), defaults=defaults)
    # Without the defaults every new field counts as a difference (the safe side).
    with pytest.raises(ValueError, match=r"ema_decay: '<not set>' -> 0.999"):
        prepare_output_dir(str(tmp_path), settings_of())
    # A field the checkpoint has and this run does not is still a difference.
    assert diff_settings({**old, "gone": 1}, old, defaults) == ["gone: 1 -> '<not set>'"]
