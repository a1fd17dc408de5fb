"""The command-line boundary: each method takes only the keys it uses, and every bad value stops
with one line (exit status 1) before any data is prepared or any model is built."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

import ar
import common
import corpus
import ddpm
import diffuser
import diffusion_lm
import mdlm
import sedd
import conftest
from conftest import run_cli

METHODS = {"ar": ar, "ddpm": ddpm, "diffusion_lm": diffusion_lm, "diffuser": diffuser, "mdlm": mdlm, "sedd": sedd}

# a shared key each method has no use for
UNUSED = [("ar", "--suffix=abc"), ("ddpm", "--prefix=abc"), ("ddpm", "--suffix=abc"), ("ddpm", "--n_head=2"),
          ("ddpm", "--dropout=0.1"), ("ddpm", "--block_size=4"), ("ddpm", "--data_dir=x"), ("ddpm", "--eval_split=test"),
          ("diffuser", "--prefix=abc"), ("diffuser", "--suffix=abc")]  # ddpm: 2-D data has no test split


def refused(method, argv):
    """main(argv) must stop with one 'error: ...' line; returns the line."""
    with pytest.raises(SystemExit) as e:
        METHODS[method].main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("method, arg", UNUSED)
def test_unused_key_is_refused_by_name(method, arg, tmp_path):
    key = arg[2:].split("=")[0]
    msg = refused(method, ["--train", arg, f"--out_dir={tmp_path}"])
    assert f"--{key} is not used by {method}.py" in msg
    assert not list(tmp_path.iterdir())  # nothing written


def test_each_config_holds_only_its_blocks():
    keys = {m: {f.name for f in dataclasses.fields(mod.Config)} for m, mod in METHODS.items()}
    assert not keys["ddpm"] & {"prefix", "suffix", "n_head", "dropout", "block_size", "data_dir", "eval_split"}
    assert "suffix" not in keys["ar"] and "prefix" in keys["ar"]
    assert not keys["diffuser"] & {"prefix", "suffix"}
    for m in ("mdlm", "sedd", "diffusion_lm"):
        assert {"prefix", "suffix", "n_head", "block_size"} <= keys[m]


COMMON_BAD = [("--batch_size=0", "--batch_size=0 must be at least 1"), ("--grad_accum=0", "--grad_accum"),
              ("--max_iters=-5", "--max_iters=-5"), ("--eval_iters=0", "--eval_iters"), ("--eval_interval=0", "--eval_interval"),
              ("--log_interval=0", "--log_interval"), ("--num_samples=0", "--num_samples"), ("--lr=nan", "--lr=nan"),
              ("--lr=inf", "--lr=inf"), ("--lr=0", "--lr=0"), ("--min_lr=-1", "--min_lr"), ("--lr=3e-5", "--min_lr=0.0001 is above --lr=3e-05"), ("--beta1=2", "--beta1=2.0 must be in [0, 1)"),
              ("--beta2=nan", "--beta2"), ("--ema=1.5", "--ema"), ("--weight_decay=-1", "--weight_decay"),
              ("--grad_clip=nan", "--grad_clip"), ("--grad_clip=inf", "--grad_clip=inf must be at least 0 (and finite)"), ("--warmup_iters=-1", "--warmup_iters"), ("--device=mps", "unknown --device=mps"),
              ("--device=cuda:x", "unknown --device"), ("--device=gpu", "unknown --device"),
              ("--seed=-1", "--seed=-1 must be a whole number"),
              ("--seed=99999999999999999999", "--seed=99999999999999999999 must be")]  # an overflow's traceback in torch
TEXT_BAD = [("--block_size=0", "--block_size=0"), ("--n_embd=0", "--n_embd=0"), ("--n_layer=0", "--n_layer"),
            ("--n_head=0", "--n_head"), ("--n_head=3", "--n_head=3"),
            ("--n_embd=36", "--n_embd=36 must be --n_head="),  # 4 heads of 9 (ar, sedd, diffuser): rotary turns pairs
            ("--dropout=1.5", "--dropout=1.5"), ("--dropout=nan", "--dropout"),
            ("--eval_split=train", "unknown --eval_split='train'; use val or test")]
OWN_BAD = {
    "ar": [("--temperature=0", "--temperature"), ("--temperature=nan", "--temperature"), ("--seq_len=-1", "--seq_len")],
    "ddpm": [("--T=1", "--T=1"), ("--n_embd=0", "--n_embd=0"), ("--n_layer=0", "--n_layer=0"), ("--n_embd=33", "--n_embd=33 must be even"),
             ("--T=10", "too small for the linear schedule"), ("--schedule=foo", "unknown --schedule"),
             ("--pred=score", "unknown --pred='score'"), ("--var=foo", "unknown --var"), ("--sampler=foo", "unknown --sampler"),
             ("--eta=2", "--eta=2.0"), ("--steps=-1", "--steps"), ("--eval_points=0", "--eval_points"),
             ("--png=s.jpg", "must name a .png file")],
    "diffusion_lm": [("--steps=0", "--steps=0"), ("--steps=300", "--steps=300 must divide T=2000 (e.g. 250 or 2000)"),
                     ("--steps=3000", "--steps=3000 must divide T=2000 (e.g. 1000 or 2000)"),
                     ("--mbr=0", "--mbr=0"), ("--clamp=dot", "unknown --clamp"), ("--eval_t_samples=0", "--eval_t_samples"), ("--embed_dim=0", "--embed_dim"), ("--T=0", "--T=0"),
                     ("--length=-1", "--length"), ("--guide_lr=nan", "--guide_lr"), ("--guide_lambda=inf", "--guide_lambda=inf"),
                     ("--guide_steps=-1", "--guide_steps"), ("--control_samples=0", "--control_samples"),
                     ("--classifier_layers=0", "--classifier_layers")],
    "diffuser": [("--T=0", "--T"), ("--p_keep=2", "--p_keep"), ("--p_keep=nan", "--p_keep"), ("--beam_b=0", "--beam_b=0 must be at least 1"),
                 ("--top_p=0", "--top_p"), ("--temperature=0", "--temperature"), ("--decode=foo", "unknown --decode"),
                 ("--seq_len=0", "--seq_len"), ("--decode_batch=0", "--decode_batch"), ("--temperature=inf", "--temperature > 0"),
                 ("--span_lambda=0", "--span_lambda > 0"),  # spans of length 0: no corruption, an identity learnt
                 (f"--p_keep={diffuser.Config().p_keep + 5e-7}", "sum to 1")],  # numpy's draw refused it mid-training
    "mdlm": [("--steps=0", "--steps=0"), ("--eval_t_samples=0", "--eval_t_samples"), ("--t_min=2", "--t_min"), ("--t_min=0", "--t_min"),
             ("--eps=0", "--eps"), ("--t_end=1", "--t_end"), ("--schedule=foo", "unknown --schedule"), ("--sampler=foo", "unknown --sampler"),
             ("--seq_len=-1", "--seq_len"), ("--stride=-1", "--stride"), ("--cond_dim=0", "--cond_dim=0"),
             ("--temperature=0", "--temperature=0.0"), ("--temperature=inf", "--temperature=inf"), ("--top_p=0", "--top_p=0.0"),
             ("--top_p=1.5", "--top_p=1.5"),  # the sampler's logits / 0, and a nucleus of no or more than all mass
             ("--eps=1e-20", "--eps=1e-20 must be in (1e-12, 1)")],  # sigma_bar(1) = inf: NaN logits, tokens drawn from them
    "sedd": [("--steps=0", "--steps=0"), ("--eval_t_samples=0", "--eval_t_samples"), ("--t_min=2", "--t_min"), ("--eps=0", "--eps"),
             ("--graph=foo", "unknown --graph"), ("--schedule=cosine", "unknown --schedule"), ("--sampler=foo", "unknown --sampler"),
             ("--sigma_min=0", "--sigma_min"), ("--sigma_max=inf", "--sigma_max"), ("--seq_len=-1", "--seq_len"),
             ("--eps=1e-20", "--eps=1e-20 must be in (1e-12, 1)"),  # sigma_bar(1) = inf: a traceback from the sampler
             ("--t_end=1e-50", "--t_end=1e-50 must be in (1e-12, 1)"),  # sigma_bar = 0 in fp32: masks left in the samples
             ("--t_min=1", "--t_min=1.0 must be in (0, 1)"), ("--sigma_min=20", "need 0 < --sigma_min (20.0) < --sigma_max (20.0)"),
             ("--cond_dim=0", "--cond_dim=0 must be at least 1"), ("--stride=-1", "--stride"),
             ("--temperature=0", "--temperature=0.0 must be a finite number above 0"), ("--top_p=1.5", "--top_p=1.5 must be in (0, 1]")],
}
BAD = [(m, arg, msg) for m in METHODS for arg, msg in COMMON_BAD + (TEXT_BAD if m != "ddpm" else []) + OWN_BAD[m]]


@pytest.mark.parametrize("method, arg, message", BAD)
@pytest.mark.parametrize("verb", ["--train", "--sample"])
def test_bad_value_stops_at_the_boundary(method, arg, message, verb, tmp_path):
    # no checkpoint and no data here: a refusal that came later would name those instead
    verb = "--eval" if common.READ_BY.get(arg[2:].split("=")[0]) == "eval" else verb  # a key only --eval reads
    msg = refused(method, [verb, arg, f"--out_dir={tmp_path / 'run'}"] + (  # --sample reads no data
        [f"--data_dir={tmp_path / 'data'}"] if method != "ddpm" and verb != "--sample" else []))
    key, other = arg[2:].split("=")[0], "--sample" if verb == "--train" else "--train"
    assert message in msg or f"--{key} is read by {other}" in msg, msg  # --png with --train, --lr with --sample: refused sooner
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--eval", "--samples_out=s.jsonl"], "--samples_out is read by --sample only"),
    (["--sample", "--gen"], "--gen is read by --eval only"),
    (["--eval", "--samples_in=s.jsonl"], "--samples_in is read by --eval --gen only"),  # it sampled instead
    (["--sample", "--samples_in=s.jsonl"], "--samples_in is read by --eval --gen only"),
    (["--eval", "--gen", "--prefix=ROMEO:"], "--prefix is read by --sample only"),  # --gen's samples ignored it
    (["--eval", "--infill=a_b"], "--infill is read by --sample only"),
    (["diffusion_lm.py", "--train", "--control=food=Italian"], "--control is read by --sample only"),  # dropped, silently, once per command
    (["diffuser.py", "--train", "--source=name : X"], "--source is read by --sample only"),
    (["diffusion_lm.py", "--eval", "--length=5"], "--length is read by --sample only"),  # the control bound is --control_targets
    (["--train", "--show"], "--show is read by --sample only"),
    (["--train", "--placeholder=#"], "--placeholder is read by --sample only"),  # saved, a bad one refused each --infill
    (["--train", "--stride=1000"], "--stride is read by --sample or --eval only"),  # saved, then refused by each --sample
    (["--eval", "--gen", "--show"], "--show is read by --sample only"),  # --gen's sampler shows nothing
    (["ddpm.py", "--eval", "--png=a.png"], "--png is read by --sample only"),
    (["ddpm.py", "--train", "--timesteps=1,2"], "--timesteps is read by --sample or --eval only; add one or drop it"),
    (["ddpm.py", "--sample", "--eval_points=30"], "--eval_points is read by --eval or --train only"),  # --train keeps it
    (["--sample", "--eval_t_samples=8"], "--eval_t_samples is read by --eval or --train only"),
    (["diffusion_lm.py", "--sample", "--control_targets=food=Italian"], "--control_targets is read by --eval or --train only"),
    (["--sample", "--judge=a.pt"], "--judge is read by --eval or --train only"),
    (["diffuser.py", "--sample", "--eval_mrs=5"], "--eval_mrs is read by --eval or --train only"),
    (["diffusion_lm.py", "--eval", "--classifier_iters=5"], "--classifier_iters is read by --train_classifier or --train only"),
    # training keys with --sample or --eval were accepted and did nothing
    (["--sample", "--lr=5"], "--lr is read by --train only; add --train or drop it"),  # (mdlm: no --train_classifier)
    (["--eval", "--max_iters=3"], "--max_iters is read by --train only"),
    (["--sample", "--resume"], "--resume is read by --train only"),
    (["diffusion_lm.py", "--eval", "--warmup_iters=5"], "--warmup_iters is read by --train or --train_classifier only"),
    (["--eval", "--eval_iters=2"], "--eval_iters is read by --train only"),  # --eval reads every window whatever it says
    (["--sample", "--compile"], "--compile is read by --train only"),
    (["--sample", "--batch_size=8"], "--batch_size is read by --train or --eval only"),  # --num_samples is one batch
    (["--sample", "--dataset=text8"], "--dataset is read by --train or --eval only"),  # the checkpoint's tokenizer decodes
    (["--sample", "--data_dir=d"], "--data_dir is read by --train or --eval only"),
    (["--eval", "--dropout=0.1"], "--dropout is read by --train only"),  # evaluation runs without dropout
    (["--sample", "--t_min=0.01"], "--t_min is read by --train or --eval only"),  # the loss's times, not the sampler's
    (["diffuser.py", "--sample", "--p_keep=0.5"], "--p_keep is read by --train or --eval only"),  # the training corruption
    (["ddpm.py", "--eval", "--batch_size=8"], "--batch_size is read by --train only"),  # --eval takes --eval_points
    (["ddpm.py", "--eval", "--num_samples=3"], "--num_samples is read by --sample or --train only"),  # --eval_points again
    (["diffusion_lm.py", "--eval", "--mbr=3"], "--mbr is read by --sample or --train or --eval --gen only"),  # the bound only
    (["--eval", "--samples_in=s.jsonl"], "--samples_in is read by --eval --gen only; add --gen or drop it")])  # what is missing
def test_a_key_without_the_verb_that_reads_it_is_refused(argv, message, tmp_path):
    method, argv = (argv[0][:-3], argv[1:]) if argv[0].endswith(".py") else ("mdlm", argv)  # a case names its file, or mdlm's
    assert message in refused(method, argv + [f"--out_dir={tmp_path}"])


def test_sampling_keys_without_a_verb_that_samples_are_refused(tmp_path):
    """sedd.py and ar.py --eval draw samples only with --gen: --eval --steps=64 scored the bound as before, silently.
    --train keeps such a key for a later --sample, and --eval --gen samples with it."""
    for method, key in (("sedd", "--steps=64"), ("sedd", "--sampler=euler"), ("ar", "--temperature=0.8"), ("ar", "--num_samples=9")):
        name = key[2:].split("=")[0]
        assert (f"--{name} is read by --sample or --train or --eval --gen only; add one or drop it"
                in refused(method, ["--eval", key, f"--out_dir={tmp_path}"]))
    for verbs in (["--train"], ["--sample"], ["--eval", "--gen"]):
        assert common.parse_args(sedd.Config, verbs + ["--steps=64", f"--out_dir={tmp_path}"])[1].steps == 64


def test_a_bare_word_a_missing_verb_and_a_missing_gpu_are_refused(monkeypatch):
    """The line for a word without -- listed --train, --sample and --eval for diffusion_lm.py too, which also
    takes --train_classifier; each method's lines name its own verbs."""
    assert "unexpected argument 'sample'; use --train, --sample, --eval or --key=value" in refused("mdlm", ["sample"])
    assert "use --train, --sample, --eval, --train_classifier or --key=value" in refused("diffusion_lm", ["train"])
    assert "say what to do: --train, --sample or --eval (plus --key=value overrides)" in refused("sedd", ["--lr=0.01"])
    assert "say what to do: --train, --sample, --eval or --train_classifier" in refused("diffusion_lm", ["--lr=0.01"])
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        assert f"--device={device} but this torch sees no GPU; use --device=cpu" in refused("ar", ["--train", f"--device={device}"])


@dataclasses.dataclass
class ForkedConfig(mdlm.Config):
    """A forker's Config (docs/new_method.md): a float knob written with an integer default, and a key of its own
    that only --sample reads."""
    READ_BY = {**mdlm.Config.READ_BY, "knob": "sample"}
    scale: float = 1
    knob: float = 0.0


def test_a_forked_config_takes_its_annotations_and_its_own_read_by(tmp_path):
    """A field's type came from its default: `scale: float = 1` refused --scale=0.8 as "a whole number". A key that
    a Config's own READ_BY gives to --sample alone was kept by the checkpoint of `--train --sample --knob=...`, so
    every later --sample used it; only common.READ_BY's keys were left out."""
    cfg = common.parse_args(ForkedConfig, ["--train", "--scale=0.8", f"--out_dir={tmp_path}"])[1]
    assert cfg.scale == 0.8 and isinstance(cfg.scale, float)
    assert "--knob is read by --sample only" in str(pytest.raises(SystemExit, common.parse_args, ForkedConfig,
                                                                  ["--train", "--knob=0.5"]).value)
    saved = {"config": dataclasses.asdict(ForkedConfig(knob=0.5, scale=0.8, prefix="AB"))}
    cfg = common.config_from_checkpoint(ForkedConfig, saved, {})
    assert (cfg.knob, cfg.scale, cfg.prefix) == (0.0, 0.8, "")
    assert {"knob", "prefix", "out_dir"} <= common.per_command(ForkedConfig) and "knob" not in common.per_command(mdlm.Config)
    assert "--gen is not used by ddpm.py; drop it" in refused("ddpm", ["--eval", "--gen"])  # it was "unknown config key"


def test_under_torchrun_only_training_runs_and_each_rank_takes_its_gpu(tmp_path, monkeypatch):
    """--sample and --eval under torchrun: every rank repeated the whole work and logged it again. A rank's
    device is its LOCAL_RANK's GPU under --device=cuda as under auto (cuda put every rank on GPU 0)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for verbs in (["--sample"], ["--eval", "--gen"]):
        assert f"only --train runs under torchrun; run {verbs[0]} with python" in refused("mdlm", verbs)
    assert "torchrun" in refused("diffusion_lm", ["--train_classifier", f"--out_dir={tmp_path}"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "auto"):
        assert common.get_device(mdlm.Config(device=device)) == common.torch.device("cuda", 1), device
    assert common.get_device(mdlm.Config(device="cpu")).type == "cpu"
    # more processes than GPUs, or every process on the GPU one --device names: one line, not a NCCL traceback
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"torchrun's process 1 has no GPU of its own: this machine has 1; use --nproc_per_node=1"):
        common.get_device(mdlm.Config(device="auto"))
    monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"--device=cuda:1 puts every torchrun process on one GPU; use --device=cuda"):
        common.get_device(mdlm.Config(device="cuda:1"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process here (a node of a multi-node run): cuda:N is its choice
    assert common.get_device(mdlm.Config(device="cuda:1")) == common.torch.device("cuda", 1)
    with pytest.raises(SystemExit, match=r"--device=cuda:2 but this machine has 2 GPU\(s\); use cuda:0 .. cuda:1"):
        common.get_device(mdlm.Config(device="cuda:2"))


def test_a_gpu_turns_tf32_on_when_it_is_picked(monkeypatch):
    """The first autocast turned TF32 on, for the rest of the process: fp32 work ran in TF32 only after one, so
    ddpm's sampler gave other numbers after --train than alone. get_device turns it on, for a GPU only."""
    flags = common.torch.backends.cuda.matmul, common.torch.backends.cudnn
    saved = [f.allow_tf32 for f in flags]  # set and restored by hand: torch 2.6's flags refuse monkeypatch's undo
    try:
        for f in flags:
            f.allow_tf32 = False
        assert common.get_device(mdlm.Config(device="cpu")).type == "cpu"
        assert not any(f.allow_tf32 for f in flags)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(common.torch.cuda, "device_count", lambda: 1)
        assert common.get_device(mdlm.Config(device="cuda")) == common.torch.device("cuda")
        assert all(f.allow_tf32 for f in flags)
    finally:
        for f, v in zip(flags, saved):
            f.allow_tf32 = v


@pytest.mark.parametrize("method", ["mdlm", "ar", "diffusion_lm", "diffuser"])
def test_resume_refuses_another_dataset_before_preparing_it(method, tmp_path, monkeypatch):
    """The data is the resumed run's: another --dataset was prepared (text8, openwebtext: downloaded) and only
    then refused by its tokenizer."""
    saved = METHODS[method].Config().dataset
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), {"method": method, "config": {"dataset": saved}})
    monkeypatch.setattr(corpus, "prepare_data", lambda *a, **k: pytest.fail("prepared"))
    msg = refused(method, ["--train", "--resume", f"--out_dir={tmp_path}", "--dataset=text8"])
    assert f"--dataset=text8: the run being resumed has --dataset={saved}; drop it" in msg


def test_a_verb_with_a_value_says_it_takes_none(tmp_path):
    assert "--train takes no value; write --train" in refused("mdlm", ["--train=true", f"--out_dir={tmp_path}"])


def test_training_memory_is_estimated_before_data(tmp_path):
    msg = refused("diffusion_lm", ["--train", "--block_size=200000", f"--out_dir={tmp_path}", f"--data_dir={tmp_path / 'd'}"])
    assert "GiB" in msg and "--block_size" in msg
    assert not list(tmp_path.iterdir())


def test_overrides_take_dashes_every_spelling_of_a_bool_and_typed_values(tmp_path):
    for spelling, value in (("--show", True), ("--show=on", True), ("--show=YES", True), ("--show=1", True),
                            ("--show=true", True), ("--show=off", False), ("--show=no", False), ("--show=0", False)):
        assert common.parse_args(mdlm.Config, ["--sample", spelling, f"--out_dir={tmp_path}"])[1].show is value, spelling
    cfg = common.parse_args(mdlm.Config, ["--train", "--max-iters=7", "--min-lr=2e-4", f"--out_dir={tmp_path}"])[1]
    assert (cfg.max_iters, cfg.min_lr) == (7, 2e-4) and type(cfg.max_iters) is int
    assert "--show takes true or false, not 'maybe'" in refused("mdlm", ["--sample", "--show=maybe", f"--out_dir={tmp_path}"])
    # a key given without its value: refused, never taken as "" (an empty --prefix or --out_dir ran silently)
    for key in ("prefix", "out_dir", "lr"):
        assert f"--{key} needs a value: --{key}=..." in refused("mdlm", ["--sample" if key != "lr" else "--train", f"--{key}"])


def test_a_constant_learning_rate_is_allowed():
    for m, mod in METHODS.items():
        mod.check_config(mod.Config(lr=1e-3, min_lr=1e-3))  # --min_lr = --lr: no decay, not a raised rate


def test_good_defaults_pass_the_checks():
    for m, mod in METHODS.items():
        mod.check_config(mod.Config())


def test_unknown_words_in_prompts():
    tok = corpus.WordTokenizer(list(corpus.WordTokenizer.SPECIALS) + ["the", "eagle", "is", "."])
    assert corpus.encode_prompt(tok, "the eagle is .", "--prefix") == [4, 5, 6, 7]
    with pytest.raises(SystemExit, match=r"--source has words outside the model's vocabulary: Eagle pubb; .*--allow_unk"):
        corpus.encode_prompt(tok, "the Eagle is pubb", "--source")
    assert corpus.encode_prompt(tok, "the Eagle", "--prefix", allow_unk=True) == [4, tok.UNK]
    char = corpus.CharTokenizer("abc")
    with pytest.raises(SystemExit, match="outside the model's 3-character vocabulary"):
        corpus.encode_prompt(char, "abd", "--prefix", allow_unk=True)


@pytest.mark.parametrize("method, arg", [("ar", "--suffix=x"), ("ddpm", "--n_head=2"), ("mdlm", "--steps=0"),
                                         ("sedd", "--device=mps"), ("diffusion_lm", "--eval_t_samples=0"),
                                         ("diffuser", "--num_samples=0")])
def test_cli_one_line_and_exit_status_1(method, arg, tmp_path):
    r = run_cli([f"{method}.py", "--sample", arg, f"--out_dir={tmp_path}"], check=False)
    assert r.returncode == 1 and r.stdout == "", r.stdout[-500:]
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr[-1500:]


def test_mdlm_cache_needs_an_unconditioned_model(tmp_path, char_data):
    out = str(tmp_path / "run")
    mdlm.main(["--train", "--time_cond=true", "--sampler=ddpm", "--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=16",
               "--batch_size=2", "--max_iters=1", "--eval_iters=1", "--eval_interval=1", f"--data_dir={char_data}", f"--out_dir={out}"])
    msg = refused("mdlm", ["--sample", "--sampler=ddpm_cache", f"--out_dir={out}"])
    assert "--sampler=ddpm_cache reuses the network output and needs a model without time conditioning" in msg


@pytest.mark.parametrize("body", [
    "import os, sys, tempfile\nprint(os.getcwd(), os.environ['DIFFLM_PROBE'], sys.argv, __file__, tempfile.gettempdir())",
    "def f():\n    raise ValueError('boom')\nprint('before')\nf()", "x = (",
    "import sys\nsys.exit('a message')", "import sys\nsys.exit(-2)",
    "import atexit\natexit.register(lambda: print('atexit ran'))\nraise KeyboardInterrupt",
    "import threading, time\nthreading.Thread(target=lambda: time.sleep(0.2) or print('joined')).start()\nprint('main')"])
@pytest.mark.skipif(sys.platform != "linux", reason="run_cli forks scripts on Linux only")
def test_a_forked_script_exits_as_a_fresh_interpreter_would(body, tmp_path):
    """run_cli forks scripts from tests/forkserver.py: the same output, traceback and exit status."""
    (tmp_path / "probe.py").write_text(body + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "DIFFLM_PROBE": "x",
           "TMPDIR": str(tmp_path)}
    fresh = subprocess.run([sys.executable, "probe.py", "--a=1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    forked = conftest.forked(["probe.py", "--a=1"], str(tmp_path), env, 60)
    assert forked is not None  # the fork path, not the fallback
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


@pytest.mark.skipif(sys.platform != "linux", reason="run_cli forks scripts on Linux only")
def test_a_forked_script_draws_its_own_seed_and_meets_its_timeout(tmp_path):
    (tmp_path / "seed.py").write_text("import torch\nprint(torch.initial_seed())\n")
    (tmp_path / "slow.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    seeds = {run_cli([str(tmp_path / "seed.py")]).stdout for _ in range(2)}
    assert len(seeds) == 2  # not the server's generator, shared by every child
    with pytest.raises(subprocess.TimeoutExpired) as e:
        run_cli([str(tmp_path / "slow.py")], timeout=1)
    assert e.value.output == "started\n"
    assert len({run_cli([str(tmp_path / "seed.py")]).stdout for _ in range(2)}) == 2  # the server still answers


def test_help_gives_each_key_the_comment_beside_it(capsys):
    """--help lists every key with its default and the comment on its Config line, a method's own line over
    the shared block's; a key without a comment ends at its default."""
    with pytest.raises(SystemExit):
        common.parse_args(diffuser.Config, ["--help"])
    out = capsys.readouterr().out
    assert re.search(r"^  --decode='greedy' +decoding: greedy \| sample \| beam \| beam2d$", out, re.M), out
    assert re.search(r"^  --allow_unk=False +let --source words outside the vocabulary", out, re.M)  # not PromptConfig's
    assert re.search(r"^  --ema=0.999 +EMA decay of the weights used for eval and sampling", out, re.M)  # BaseConfig's
    assert re.search(r"^  --grad_accum=1$", out, re.M)
    assert len(re.findall(r"^  --\w+=", out, re.M)) == len(dataclasses.fields(diffuser.Config))


def test_a_checkpoint_never_chooses_the_split_a_plain_eval_scores():
    """--train --eval_split=test was taken (training's evals never read it) and saved, and every later plain
    --eval scored the test split. Only --eval reads it now, and a saved one is not carried over."""
    assert "eval_split" in common.per_command(mdlm.Config)
    saved = {"config": {**dataclasses.asdict(mdlm.Config()), "eval_split": "test"}}  # as an older checkpoint holds it
    assert common.config_from_checkpoint(mdlm.Config, saved, {}).eval_split == "val"
    assert common.config_from_checkpoint(mdlm.Config, saved, {"eval_split": "test"}).eval_split == "test"
    with pytest.raises(SystemExit, match="--eval_split is read by --eval only; add --eval or drop it"):
        common.parse_args(mdlm.Config, ["--train", "--eval_split=test"])


def test_a_misspelt_key_names_the_closest_keys(tmp_path):
    """An unknown --key is refused with the valid keys nearest its spelling (a verb too), or a pointer to the Config."""
    assert "unknown config key --max_iter; did you mean --max_iters" in refused("mdlm", ["--train", "--max_iter=5",
                                                                                      f"--out_dir={tmp_path}"])
    assert "did you mean --sample, --sampler" in refused("mdlm", ["--train", "--sampel", f"--out_dir={tmp_path}"])
    assert "unknown config key --zzz; see the Config class for the keys" in refused("mdlm", ["--train", "--zzz=1"])


def test_each_method_has_its_own_default_out_dir():
    """Without --out_dir a run writes under out/<method>: two methods trained with their defaults never share (and
    refuse or overwrite) one folder."""
    assert common.out_dir(mdlm.Config(), "mdlm") == "out/mdlm" and common.out_dir(ar.Config(), "ar") == "out/ar"
    assert common.out_dir(mdlm.Config(out_dir="/x/run"), "mdlm") == "/x/run"
