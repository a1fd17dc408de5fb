"""A run owns its out_dir, checkpoints are verified, disk errors are one line, resume is exact.

The default tests train tiny models for a few iterations; the kill -9 test is slow (pytest -m slow).
"""
import dataclasses
import errno
import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli, shared_data

import ar
import common
import corpus
import mdlm as M
import trainer

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4", "--log_interval=1",
        "--eval_iters=1", "--device=cpu"]


def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def mdlm(out, char_data, *extra):
    return ["mdlm.py", "--train", f"--data_dir={char_data}", f"--out_dir={out}", "--eval_interval=3"] + TINY + list(extra)


@pytest.fixture(scope="module")
def run6(tmp_path_factory, char_data):
    """An mdlm run of 6 iterations, checkpointed at iterations 2 and 5."""
    out = tmp_path_factory.mktemp("run6")
    run_cli(mdlm(out, char_data, "--max_iters=6"))
    return str(out), char_data


def copy_run(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in ("ckpt.pt", "log.jsonl"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return str(dst)


def log_records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_over_a_checkpoint_needs_resume_or_overwrite(run6, tmp_path):
    src, data = run6
    out = copy_run(src, tmp_path / "run")
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    r = run_cli(mdlm(out, data, "--max_iters=3"), check=False)
    one_line_error(r, "holds a checkpoint", "--resume", "--overwrite")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    one_line_error(run_cli(mdlm(out, data, "--max_iters=3", "--resume", "--overwrite"), check=False), "pass one of them")
    # an --overwrite refused on its data keeps the earlier checkpoint: the new run's first one replaces it
    one_line_error(run_cli(mdlm(out, data, "--max_iters=3", "--overwrite", "--block_size=200000"), check=False),
                   "fewer than block_size")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    run_cli(mdlm(out, data, "--max_iters=3", "--overwrite"))
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter"] == 2
    assert [r["iter"] for r in log_records(out) if "loss" in r] == [0, 1, 2]  # the old run's log went with it


def test_train_over_another_methods_checkpoint_names_that_method(run6, tmp_path):
    """--resume would fail on it (another method's model): the refusal says which file continues it instead."""
    src, data = run6
    out = copy_run(src, tmp_path / "run")
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    r = run_cli(["sedd.py", "--train", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=3"] + TINY, check=False)
    one_line_error(r, "was trained by mdlm.py, not sedd.py", f"python mdlm.py --train --resume --out_dir={out}`",
                   "--overwrite")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    run_cli(["sedd.py", "--train", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3",
             "--overwrite"] + TINY)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["method"] == "sedd"


def test_second_run_into_the_same_folder_stops_at_once(tmp_path, char_data):
    out = tmp_path / "busy"
    with trainer.own_out_dir(str(out)):  # this test process is "the first run"
        r = run_cli(mdlm(out, char_data, "--max_iters=3"), check=False)
        one_line_error(r, "in use by another run", f"pid {os.getpid()}")
        assert not os.path.exists(out / "ckpt.pt")
    # released: the next run goes ahead
    run_cli(mdlm(out, char_data, "--max_iters=3"))
    assert os.path.isfile(out / "ckpt.pt")


def test_resume_logs_each_iteration_once(run6, tmp_path):
    src, data = run6
    out = copy_run(src, tmp_path / "killed")
    # what a run killed after iteration 7 leaves: records past the checkpoint (5) and a cut line
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        for it in (6, 7):
            f.write(json.dumps({"iter": it, "loss": 9.0}) + "\n")
        f.write('{"iter": 8, "lo')
    run_cli(mdlm(out, data, "--max_iters=9", "--resume"))
    recs = log_records(out)
    assert [r["iter"] for r in recs if "loss" in r] == list(range(9))
    assert [r["iter"] for r in recs if "eval" in r] == [2, 5, 8]
    assert all(r["loss"] != 9.0 for r in recs if "loss" in r)
    times = [r["time"] for r in recs]  # the run's own clock goes on where the checkpoint left it
    assert times == sorted(times) and times[-1] > common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")["time"]


def test_the_eta_leaves_out_the_first_iterations_one_off_costs(tmp_path, char_data, monkeypatch, capsys):
    """A first iteration slowed by a one-off cost (the kernel build on a first run) must not inflate
    every later ETA: the first line has none, the next ones count from the end of the first iteration."""
    calls = []

    def slow_first(*args):
        if not calls:
            time.sleep(2.5)
        calls.append(1)
        return loss_fn(*args)

    loss_fn = M.loss_fn
    monkeypatch.setattr(M, "loss_fn", slow_first)
    M.main(mdlm(tmp_path, char_data, "--max_iters=4", "--eval_interval=100")[1:])
    eta = [line.rsplit("| eta ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    assert eta == ["-", "0m00s", "0m00s", "0m00s"], eta


def test_an_interrupt_is_one_line_on_rank_0_and_silent_on_the_others():
    """trainer.interruptible: Ctrl-C or SIGTERM ends the process with rank 0's line; another rank (said() None)
    exits with status 1 and no line, and the SIGTERM handler in place before is back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    for said, code in ((lambda: "interrupted at iteration 3", "error: interrupted at iteration 3"), (lambda: None, 1)):
        with pytest.raises(SystemExit) as e:
            with trainer.interruptible(said):
                assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
                raise KeyboardInterrupt
        assert e.value.code == code
        assert signal.getsignal(signal.SIGTERM) is before


def test_a_published_models_eval_record_survives_a_new_run(tmp_path):
    """`--eval --init_from` logs {"iter": null}; a later run into the folder truncates around it."""
    path = str(tmp_path / "log.jsonl")
    recs = [{"eval_full": {"val_nelbo": 3.0}, "iter": None}, {"iter": 0, "loss": 4.0}, {"iter": 3, "loss": 2.0}]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs + [[1, 2], "x"])  # lines that are JSON but no record go
    trainer.truncate_log(path, 0)
    assert [r["iter"] for r in log_records(str(tmp_path))] == [None, 0]
    trainer.truncate_log(path, -1)  # a fresh run
    assert [r["iter"] for r in log_records(str(tmp_path))] == [None]


def test_a_run_without_ema_samples_from_its_trained_weights(run6, tmp_path):
    """--ema at --sample/--eval picks the EMA weights only where the run kept some: a run trained with
    --ema=0 stores its initial weights as "ema", which must never be loaded."""
    src, _ = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    untouched = {k: torch.zeros_like(v) for k, v in ckpt["ema"].items()}
    common.save_checkpoint(str(tmp_path / "no_ema" / "ckpt.pt"),
                           {**ckpt, "config": {**ckpt["config"], "ema": 0.0}, "ema": untouched})
    from mdlm import Config, build_model  # (mdlm here is the command-line helper above)
    for ema in (0.0, 0.999):
        _, model, *_ = trainer.load_for_inference(Config, {"out_dir": str(tmp_path / "no_ema"), "ema": ema}, "mdlm",
                                                  build_model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, ckpt["model"][k]), (ema, k)


def test_a_checkpoint_config_keeps_the_run_not_what_one_command_asked():
    """--sample and --eval (and --resume) take the run's config, but not the output files, device or verbs'
    switches of the command that trained it: a later plain --sample overwrote that command's --samples_out."""
    saved = dataclasses.asdict(M.Config(samples_out="first.jsonl", gen=True, device="cuda", show=True, steps=64,
                                        dataset="upg", data_dir="/x/upg", prefix="ROMEO:"))  # --train --sample --prefix=
    cfg = common.config_from_checkpoint(M.Config, {"config": saved}, {})
    assert (cfg.samples_out, cfg.gen, cfg.device, cfg.show, cfg.steps, cfg.data_dir) == ("", False, "auto", False, 64, "/x/upg")
    assert cfg.prefix == ""  # every later --sample was conditioned on it, and --infill refused
    assert common.config_from_checkpoint(M.Config, {"config": saved}, {"dataset": "upg"}).data_dir == "/x/upg"  # its own
    assert common.config_from_checkpoint(M.Config, {"config": saved}, {"dataset": "text8"}).data_dir == ""
    moved = {"config": {**saved, "out_dir": "/where/it/was/trained", "eval_data": "ptb"}}  # resumed where it is now;
    assert common.config_from_checkpoint(M.Config, moved, {}).out_dir == ""  # its training command's --eval_data
    assert common.config_from_checkpoint(M.Config, moved, {}).eval_data == ""  # is not a later --eval's data
    with pytest.raises(SystemExit, match="--eval_data is read by --eval only"):  # (which --train never read)
        common.parse_args(M.Config, ["--train", "--eval_data=ptb"])
    import sedd  # a checkpoint that names its schedule "noise", as older ones do: sampled and resumed with it
    old = {**{k: v for k, v in dataclasses.asdict(sedd.Config()).items() if k != "schedule"}, "noise": "geometric"}
    assert common.config_from_checkpoint(sedd.Config, {"config": old}, {}).schedule == "geometric"
    import diffuser  # draw settings saved with --decode=sample belong to it: a later --decode=greedy is not refused
    drawn = {"config": dataclasses.asdict(diffuser.Config(decode="sample", temperature=0.8, top_p=0.6))}
    cfg = common.config_from_checkpoint(diffuser.Config, drawn, {"decode": "greedy"})
    diffuser.check_config(cfg)
    assert (cfg.temperature, cfg.top_p) == (1, 1)
    assert common.config_from_checkpoint(diffuser.Config, drawn, {"decode": "sample"}).temperature == 0.8
    assert common.config_from_checkpoint(diffuser.Config, drawn, {}).top_p == 0.6
    with pytest.raises(SystemExit, match="shape --decode=sample's draws"):  # asked for together: still refused
        diffuser.check_config(common.config_from_checkpoint(diffuser.Config, drawn, {"decode": "beam", "top_p": 0.6}))


def test_resume_checks_method_shape_and_keys(run6, tmp_path):
    src, data = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    other = tmp_path / "other"
    common.save_checkpoint(str(other / "ckpt.pt"), {**ckpt, "method": "sedd"})
    one_line_error(run_cli(mdlm(other, data, "--max_iters=9", "--resume"), check=False), "trained by sedd.py")
    for bad in ("--n_embd=64", "--n_head=4"):  # n_head: weights of the same shape, another model
        one_line_error(run_cli(mdlm(copy_run(src, tmp_path / "shape"), data, "--max_iters=9", "--resume", bad),
                               check=False), f"{bad.split('=')[0]} is fixed by the checkpoint")
    for key in ("optimizer", "data_rng"):
        lacking = tmp_path / f"no_{key}"
        common.save_checkpoint(str(lacking / "ckpt.pt"), {k: v for k, v in ckpt.items() if k != key})
        one_line_error(run_cli(mdlm(lacking, data, "--max_iters=9", "--resume"), check=False), f"lacks {key}")
    for n in (3, 6):  # 6: the run's own length, which a resume finished with 0 iterations and a success
        one_line_error(run_cli(mdlm(copy_run(src, tmp_path / f"past{n}"), data, f"--max_iters={n}", "--resume"), check=False),
                       f"is at iteration 5: the --max_iters={n} iterations are done; raise --max_iters")


def test_an_ema_turned_on_at_resume_starts_from_the_trained_weights(run6, tmp_path):
    """A run trained with --ema=0 saved its initial weights as "ema"; an EMA turned on at --resume averaged
    the trained weights into them, and --eval scored that blend."""
    src, data = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    out = tmp_path / "ema_on"
    common.save_checkpoint(str(out / "ckpt.pt"), {**ckpt, "config": {**ckpt["config"], "ema": 0.0},
                                                  "ema": {k: torch.zeros_like(v) for k, v in ckpt["ema"].items()}})
    run_cli(mdlm(out, data, "--max_iters=7", "--resume", "--ema=0.999"))
    after = common.load_checkpoint(os.path.join(out, "ckpt.pt"), "mdlm")
    d = 7 / 16  # ema_update's warm-up decay at iteration 6, the one step trained
    for k, v in after["model"].items():  # the EMA of the checkpoint's weights and this step's, not of zeros
        torch.testing.assert_close(after["ema"][k], d * ckpt["model"][k] + (1 - d) * v, msg=k)


def test_resume_keeps_the_runs_settings(run6, tmp_path):
    """--resume takes the run's own config, with the command line on top: a key not repeated keeps the run's
    value, where it used to fall back to the default (and a different model failed to load, or trained on)."""
    src, data = run6
    out = copy_run(src, tmp_path / "resumed")
    run_cli(["mdlm.py", "--train", "--resume", f"--out_dir={out}", "--max_iters=9", "--lr=5e-4", "--weight_decay=0.5",
             "--beta1=0.5", "--beta2=0.9"])
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), "mdlm")
    saved = ckpt["config"]
    assert saved["max_iters"] == 9 and saved["lr"] == 5e-4
    # the optimizer trained with them too (its saved groups held the old run's)
    assert [(g["weight_decay"], g["betas"]) for g in ckpt["optimizer"]["param_groups"]] == [(0.5, (0.5, 0.9)), (0.0, (0.5, 0.9))]
    assert (saved["n_embd"], saved["block_size"], saved["batch_size"], saved["data_dir"]) == (32, 32, 4, data)
    # data whose symbols differ from the run's, though their number is the same, is refused; a --dataset given
    # alone to --eval drops the run's data_dir (which would win over it), and --resume refuses it
    other = tmp_path / "other_symbols"
    shutil.copytree(data, other)
    meta = json.load(open(other / "meta.json"))
    meta["chars"] = meta["chars"][::-1]
    json.dump(meta, open(other / "meta.json", "w"))
    one_line_error(run_cli(["mdlm.py", "--train", "--resume", f"--out_dir={out}", "--max_iters=12",
                            f"--data_dir={other}"], check=False), "with other symbols",
                   f"resume with the run's own data (--dataset=shakespeare_char --data_dir={data}, which `python ",
                   "data/shakespeare_char/prepare.py", "` prepared)")  # the command that prepares it again
    cfg = common.parse_args(M.Config, ["--eval", f"--out_dir={out}", "--dataset=text8"])[1]
    assert cfg.dataset == "text8" and cfg.data_dir == ""
    with pytest.raises(SystemExit, match="the run being resumed has --dataset=shakespeare_char"):  # its data is the run's
        common.parse_args(M.Config, ["--train", "--resume", f"--out_dir={out}", "--dataset=text8"])
    # so are its random streams: a --seed was ignored by training (the saved states win) yet changed the evals
    with pytest.raises(SystemExit, match="--seed=7: the run being resumed has --seed=1337; drop it"):
        common.parse_args(M.Config, ["--train", "--resume", f"--out_dir={out}", "--seed=7"])
    assert common.parse_args(M.Config, ["--train", "--resume", f"--out_dir={out}", "--seed=1337"])[1].seed == 1337
    # what else a method fixes beside the shape (ddpm: T, schedule, pred), and a spent --init_from
    import ddpm
    d = tmp_path / "ddpm"
    common.save_checkpoint(str(d / "ckpt.pt"), {"method": "ddpm", "config": dataclasses.asdict(ddpm.Config(T=100))})
    assert common.parse_args(ddpm.Config, ["--train", "--resume", f"--out_dir={d}"])[1].T == 100
    with pytest.raises(SystemExit, match="--T is fixed by the checkpoint"):
        common.parse_args(ddpm.Config, ["--train", "--resume", f"--out_dir={d}", "--T=500"])
    run_cli(["ddpm.py", "--train", f"--out_dir={d}", "--overwrite", "--T=100", "--n_layer=1", "--n_embd=16", "--batch_size=16",
             "--max_iters=2", "--eval_iters=1", "--eval_interval=2"])
    one_line_error(run_cli(["ddpm.py", "--train", "--resume", f"--out_dir={d}", "--max_iters=4", "--dataset=two_moons"],
                           check=False), "trained on eight_gaussians, this run's data is two_moons")
    common.save_checkpoint(str(tmp_path / "ft" / "ckpt.pt"),
                           {"method": "mdlm", "config": dataclasses.asdict(M.Config(init_from="kuleshov-group/mdlm-owt"))})
    assert common.parse_args(M.Config, ["--train", "--resume", f"--out_dir={tmp_path / 'ft'}"])[1].init_from == ""
    # mdlm's --time_cond: a fine-tuned published model keeps its adaLN layers either way, so the weights loaded and
    # the network was fed times it never saw, silently
    with pytest.raises(SystemExit, match=r"--time_cond is fixed by the checkpoint \(False\)"):
        common.parse_args(M.Config, ["--eval", f"--out_dir={tmp_path / 'ft'}", "--time_cond=true"])
    with pytest.raises(SystemExit, match=r"--eps is fixed by the checkpoint \(0.001\)"):  # alpha_1 = eps: the bound's end
        common.parse_args(M.Config, ["--eval", f"--out_dir={tmp_path / 'ft'}", "--eps=0.01"])
    common.RESUMED.clear()  # read for runs this test does not train


def test_a_rank_the_checkpoint_has_no_streams_for_draws_its_own(run6, capsys):
    """A one-process run resumed by two: rank 1 keeps the streams seeded for it, where it used to copy rank 0's
    (both ranks then drew the same batches and noise, and DDP averaged two equal gradients)."""
    src, data = run6
    path = os.path.join(src, "ckpt.pt")
    ckpt = common.load_checkpoint(path, "mdlm")
    assert len(ckpt["data_rng"]) == 1
    cfg = M.Config(**{**ckpt["config"], "resume": True, "max_iters": 9})
    for rank in (0, 1):
        model = M.build_model(cfg, ckpt["meta"])
        ema, opt = M.build_model(cfg, ckpt["meta"]), trainer.make_optimizer(model, cfg, torch.device("cpu"))
        batches = corpus.Batches(cfg, ckpt["meta"], seed=cfg.seed + 1000 * rank)
        fresh = batches.gen.get_state()
        assert trainer.resume_from(path, "mdlm", cfg, ckpt["meta"], model, ema, opt, batches, rank, 2, torch.device("cpu"))[0] == 6
        assert torch.equal(batches.gen.get_state(), ckpt["data_rng"][0] if rank == 0 else fresh)
        said = capsys.readouterr().out  # rank 0 says that a step's batch doubles, and that rank 1 draws fresh streams
        assert ("a step's batch is 2 x 4 x 1" in said and "was 1 x 4 x 1; ranks 1 and up draw fresh" in said) == (rank == 0), said
    assert not torch.equal(fresh, ckpt["data_rng"][0])


def test_resume_on_another_device_kind_takes_that_devices_adamw(run6, tmp_path):
    """load_state_dict takes the saved groups' fused/foreach flags: a GPU run's checkpoint (fused AdamW) resumed on
    a CPU kept fused, a CPU run's on a GPU foreach. The resumed optimizer is this device's, with the same state."""
    src, _ = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    for g in ckpt["optimizer"]["param_groups"]:
        assert g["foreach"] and not g.get("fused")
        g["fused"], g["foreach"] = True, None  # as a GPU run saves them
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, ckpt)
    cfg = M.Config(**{**ckpt["config"], "resume": True, "max_iters": 9})
    model = M.build_model(cfg, ckpt["meta"])
    ema, opt = M.build_model(cfg, ckpt["meta"]), trainer.make_optimizer(model, cfg, torch.device("cpu"))
    trainer.resume_from(path, "mdlm", cfg, ckpt["meta"], model, ema, opt, corpus.Batches(cfg, ckpt["meta"], 0), 0, 1,
                        torch.device("cpu"))
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups), opt.param_groups[0]
    saved = ckpt["optimizer"]["state"][0]
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], saved["exp_avg"])


def test_a_diverged_model_evaluates_to_an_infinite_perplexity(run6):
    """A run whose loss stays finite but huge (--lr=10) reported an OverflowError traceback at its first eval."""
    src, data = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    cfg = M.Config(**{**ckpt["config"], "eval_iters": 1})
    model = M.build_model(cfg, ckpt["meta"])
    with torch.no_grad():
        model.head.weight.normal_(std=1e5)
    stats = M.evaluate(model, corpus.Batches(cfg, ckpt["meta"], 0), cfg)
    assert stats["val_nelbo"] > 709 and stats["val_ppl"] == math.inf


def test_a_diverged_eval_keeps_the_last_good_checkpoint(run6, tmp_path, monkeypatch, capsys):
    """An eval that scores inf while the training loss is still finite wrote its weights over the last good
    checkpoint, and the loss check that stopped the run next called that one good."""
    src, data = run6
    out = copy_run(src, tmp_path / "run")
    good = common.load_checkpoint(os.path.join(out, "ckpt.pt"), "mdlm")
    evaluate = M.evaluate
    monkeypatch.setattr(M, "evaluate", lambda m, b, cfg, **kw: {**evaluate(m, b, cfg, **kw), "val_nelbo": math.inf})
    with pytest.raises(SystemExit) as e:
        M.main(mdlm(out, data, "--max_iters=9", "--resume")[1:])
    assert str(e.value).startswith("error: val_nelbo became inf in the eval at iteration 8; the last good checkpoint")
    assert "(iteration 5) is kept" in str(e.value)
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"), "mdlm")["iter"] == good["iter"] == 5


def test_resume_on_other_text_of_the_same_tokenizer_is_refused(run6, tmp_path):
    """--resume --data_dir=<another corpus> with the same characters trained on, silently."""
    src, data = run6
    out = copy_run(src, tmp_path / "run")
    other = tmp_path / "other"
    os.makedirs(other)
    meta = json.load(open(os.path.join(data, "meta.json")))
    ids = np.fromfile(os.path.join(data, "train.bin"), dtype=meta["dtype"])
    corpus.write_split(str(other), ids[::-1][:50_000], ids[:5_000], {k: meta[k] for k in corpus.TOKENIZER_KEYS if k in meta})
    r = run_cli(mdlm(out, other, "--max_iters=9", "--resume"), check=False)
    one_line_error(r, "was trained on other text than", "(its train.bin differs); resume with the run's own data "
                   f"(--dataset=shakespeare_char --data_dir={data}, which `python ")


def test_a_diverged_judge_scores_an_infinite_perplexity(monkeypatch, capsys):
    """--eval --gen ended in an OverflowError traceback, all its samples lost, when the judge's NLL passed 709."""
    monkeypatch.setattr(trainer, "judge_samples", lambda *a: (800.0, [torch.tensor([1, 2, 3])]))
    stats = trainer.generative_eval("judge.pt", lambda n: torch.zeros(n, 3, dtype=torch.long), 2, {}, None)
    assert stats["gen_nll"] == 800.0 and stats["gen_ppl"] == math.inf and "(perplexity inf)" in capsys.readouterr().out


def test_perplexity_and_time_per_sample_figures(monkeypatch):
    """exp(nats) up to float64's range (inf only past it), bits = nats / ln 2; s/sample is the draw's time over
    the number of samples."""
    stats = trainer.nats_figures("val_nll", 100.0)
    assert stats["val_ppl"] == pytest.approx(math.exp(100.0)) and stats["val_bits"] == pytest.approx(100 / math.log(2))
    assert trainer.nats_figures("val_nll", 800.0)["val_ppl"] == math.inf
    clock = iter([10.0, 16.0])
    monkeypatch.setattr(trainer.time, "time", lambda: next(clock))
    monkeypatch.setattr(trainer, "judge_samples", lambda *a: (1.0, [torch.tensor([1, 2, 3])]))
    stats = trainer.generative_eval("judge.pt", lambda n: torch.zeros(n, 3, dtype=torch.long), 3, {}, None)
    assert stats["sec_per_sample"] == pytest.approx(2.0)


def test_the_time_per_sample_waits_for_the_gpus_queued_steps(monkeypatch):
    """A sampler that never reads its result back (ar.py's) left its last steps queued on a GPU, and its
    s/sample left them out; generative_eval now waits for the samples' device before it reads the clock."""
    class OnGPU(torch.Tensor):  # a CPU tensor that says it is on a GPU: the branch, without one
        is_cuda = property(lambda self: True)
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (time.sleep(0.3), waited.append(device)))
    monkeypatch.setattr(trainer, "judge_samples", lambda *a: (1.0, [torch.tensor([1, 2, 3])]))
    stats = trainer.generative_eval("judge.pt", lambda n: torch.zeros(n, 3, dtype=torch.long).as_subclass(OnGPU), 2, {}, None)
    assert waited == [torch.device("cpu")] and stats["sec_per_sample"] >= 0.15


def tensor_data_span(path):
    """(offset, length) of the largest tensor record inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_flipped_bytes_in_a_checkpoint_do_not_load(run6, tmp_path):
    src, _ = run6
    data = bytearray(open(os.path.join(src, "ckpt.pt"), "rb").read())
    start, n = tensor_data_span(os.path.join(src, "ckpt.pt"))
    bad = tmp_path / "flipped"
    bad.mkdir()
    data[start + n // 2] ^= 0x10  # one bit of one weight
    (bad / "ckpt.pt").write_bytes(bytes(data))
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={bad}", "--num_samples=1", "--steps=2"], check=False)
    one_line_error(r, "do not match its checksum")
    # a bit flipped in the checksum's own key loaded the file unverified, as if an older difflm had written it
    named = bytearray(open(os.path.join(src, "ckpt.pt"), "rb").read())
    named[named.index(b"checksum") + 2] ^= 0x04  # "chgcksum"
    (bad / "ckpt.pt").write_bytes(bytes(named))
    with pytest.raises(SystemExit, match="do not match its checksum"):
        common.load_checkpoint(str(bad / "ckpt.pt"), "mdlm")
    # a bit flipped anywhere either stops with one line or changes nothing that the checkpoint holds
    want = common.checksum(common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm"))
    gen = torch.Generator().manual_seed(int(time.time()))
    for pos in torch.randint(len(data), (40,), generator=gen).tolist():
        flipped = bytearray(open(os.path.join(src, "ckpt.pt"), "rb").read())
        flipped[pos] ^= 1 << int(torch.randint(8, (1,), generator=gen))
        (bad / "ckpt.pt").write_bytes(bytes(flipped))
        try:
            got = common.load_checkpoint(str(bad / "ckpt.pt"), "mdlm")
        except SystemExit as e:
            assert str(e).startswith("error: ") and "\n" not in str(e)
            continue
        assert common.checksum(got) == want, pos


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(run6, tmp_path, capsys):
    """One written before difflm stored checksums: its contents cannot be verified, and it still loads."""
    ckpt = common.load_checkpoint(os.path.join(run6[0], "ckpt.pt"), "mdlm")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    got = common.load_checkpoint(str(tmp_path / "ckpt.pt"), "mdlm")
    assert common.checksum(got) == common.checksum(ckpt)
    assert "carries no checksum" in capsys.readouterr().err


def test_a_file_that_is_not_a_whole_checkpoint_is_one_line(run6, tmp_path):
    """A torch file of another kind, and a verified checkpoint that lacks a part --sample needs."""
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match=r"list.pt is not a difflm checkpoint \(a list, not a dict\); retrain with"):
        common.load_checkpoint(str(tmp_path / "list.pt"), "mdlm")
    ckpt = common.load_checkpoint(os.path.join(run6[0], "ckpt.pt"), "mdlm")
    del ckpt["meta"]
    common.save_checkpoint(str(tmp_path / "part" / "ckpt.pt"), ckpt)
    with pytest.raises(SystemExit, match=r"ckpt.pt lacks meta; it is not a complete mdlm.py checkpoint: retrain with"):
        trainer.load_for_inference(M.Config, {"out_dir": str(tmp_path / "part")}, "mdlm", M.build_model)


def test_nan_weights_are_refused(run6, tmp_path):
    src, _ = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    name = next(k for k, v in ckpt["ema"].items() if v.is_floating_point())
    ckpt["ema"][name] = ckpt["ema"][name].clone()
    ckpt["ema"][name].view(-1)[0] = float("nan")
    common.save_checkpoint(str(tmp_path / "nan" / "ckpt.pt"), ckpt)  # a valid checksum over a NaN
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={tmp_path / 'nan'}", "--num_samples=1", "--steps=2"], check=False)
    one_line_error(r, "NaN or inf", name)


def test_full_disk_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "iter": 1})
    before = open(path, "rb").read()

    class FullDisk(io.FileIO):  # room for 1000 bytes: torch's zip writer then reports a RuntimeError
        def write(self, b):
            if self.tell() + len(b) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    monkeypatch.setattr(common, "open", FullDisk, raising=False)
    with pytest.raises(SystemExit) as e:
        common.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "iter": 2})
    assert "No space left on device" in str(e.value) and "previous checkpoint is kept" in str(e.value)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the tmp file went
    assert open(path, "rb").read() == before


def test_an_interrupted_checkpoint_write_leaves_no_tmp(tmp_path, monkeypatch):
    """Ctrl-C inside torch.save left a partial ckpt.pt.<host>.<pid>.tmp, as large as the model, in out_dir."""
    path = str(tmp_path / "ckpt.pt")

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"iter": 0})
    assert os.listdir(tmp_path) == []


def test_an_interrupt_inside_torchs_zip_writer_is_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while torch's zip writer wrote ckpt.pt came out as a RuntimeError ("unexpected pos")
    holding the KeyboardInterrupt, which was taken for a failed write: "cannot write ckpt.pt: ; the previous
    checkpoint is kept; free disk space". It is the interrupt, which the training loop answers with --resume."""
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "iter": 1})
    before = open(path, "rb").read()

    class Interrupted(io.FileIO):  # the signal arrives as the writer's second record goes out
        def write(self, b):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().write(b)

    monkeypatch.setattr(common, "open", Interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "iter": 2})
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_is_one_line_naming_resume(tmp_path, char_data, sig):
    """Ctrl-C during training printed a 20-frame KeyboardInterrupt traceback and nothing about how to go on;
    SIGTERM (a scheduler's preemption) ended the run with no word at all."""
    args = [sys.executable] + mdlm(tmp_path, char_data, "--max_iters=100000", "--eval_interval=2")
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # a background
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # job's children ignore SIGINT
    seen_eval = False
    for line in p.stdout:  # an iteration after the first eval: its checkpoint is written
        if seen_eval and line.startswith("iter"):
            break
        seen_eval = seen_eval or line.startswith("eval")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    # torch built for CUDA, on a machine with nvcc and no GPU, says so once as it builds the kernels (from 2.14 as a log record)
    lines = [line for line in err.strip().splitlines() if "No CUDA runtime is found, using CUDA_HOME" not in line]
    assert p.returncode == 1 and "Traceback" not in err and len(lines) == 1, err
    assert "interrupted" in err and "continue with --resume" in err, err
    run_cli(mdlm(tmp_path, char_data, "--max_iters=6", "--resume", "--eval_interval=2"))


def test_an_overwrite_stopped_before_its_first_checkpoint_keeps_the_earlier_run(run6, tmp_path):
    """--overwrite interrupted before its first eval: the earlier run's log was already cut to the new run's
    first record, and the message sent the user to --resume the earlier run's checkpoint under the new settings."""
    src, data = run6
    out = copy_run(src, tmp_path / "run")
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("ckpt.pt", "log.jsonl")}
    args = [sys.executable] + mdlm(out, data, "--max_iters=100000", "--eval_interval=100000", "--overwrite")
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith("iter"):  # it logged an iteration (held, not written)
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "before the first eval" in err and "still the earlier run's" in err, err
    assert {name: open(os.path.join(out, name), "rb").read() for name in before} == before


def test_unwritable_out_dir_is_one_line(tmp_path, char_data, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    r = run_cli(mdlm(tmp_path / "file" / "run", char_data, "--max_iters=3"), check=False)
    one_line_error(r, "cannot write to")
    r = run_cli(mdlm(tmp_path / "file", char_data, "--max_iters=3"), check=False)  # it said "File exists"
    one_line_error(r, f"cannot write to {tmp_path / 'file'}: it is a file, not a folder; choose another --out_dir")
    # a read-only folder (root ignores permission bits, so the refusal is injected where it would come)
    real_open = open

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    for write in (lambda: common.save_checkpoint(str(tmp_path / "ro" / "ckpt.pt"), {"iter": 0}),
                  lambda: trainer.log_json(str(tmp_path / "ro" / "log.jsonl"), {"iter": 0}),
                  lambda: trainer.own_out_dir(str(tmp_path / "ro")).__enter__()):
        with pytest.raises(SystemExit) as e:
            write()
        assert "Read-only file system" in str(e.value) and "\n" not in str(e.value)


def test_tmp_names_are_unique_per_process(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(a), real_replace(a, b)))
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), {"iter": 0})
    assert seen and str(os.getpid()) in os.path.basename(seen[0]) and seen[0] != str(tmp_path / "ckpt.pt.tmp")


def losses(out):
    return {r["iter"]: r["loss"] for r in log_records(out) if "loss" in r}


def test_diffuser_resume_reproduces_uninterrupted_run(tmp_path):
    """DiffusER's batches change shape every step; its resume is exact on two threads too."""
    args = ["diffuser.py", "--train", "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=8", "--log_interval=1",
            "--eval_iters=1", "--eval_interval=3", "--device=cpu", "--lr_decay_iters=8", "--warmup_iters=2"]
    env = {"OMP_NUM_THREADS": "2"}
    run_cli(args + [f"--out_dir={tmp_path / 'full'}", "--max_iters=8"], env=env)
    run_cli(args + [f"--out_dir={tmp_path / 'part'}", "--max_iters=3"], env=env)
    run_cli(args + [f"--out_dir={tmp_path / 'part'}", "--max_iters=8", "--resume"], env=env)
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == list(range(8)) and full == part
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    for part in ("model", "ema"):  # the averaged weights too, which --sample and --eval read
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mdlm", "diffuser"])
def test_kill_9_then_resume_is_bitwise(tmp_path, char_data, method):
    """One kill -9 in the middle of training, then --resume: the same weights and log as without it."""
    args = [f"{method}.py", "--train", "--n_layer=1", "--n_embd=32", "--n_head=2", "--log_interval=1", "--eval_iters=1",
            "--eval_interval=2", "--device=cpu", "--max_iters=12", "--warmup_iters=2"]
    args += [f"--data_dir={char_data}", "--block_size=32", "--batch_size=4"] if method == "mdlm" else ["--batch_size=8"]
    env = {**os.environ, "DIFFLM_DATA": shared_data(), "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    run_cli(args + [f"--out_dir={tmp_path / 'full'}"], env=env)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable] + args + [f"--out_dir={out}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # kill once the second checkpoint is written and training has moved on
        if line.startswith("iter     5/"):
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] < 11
    run_cli(args + [f"--out_dir={out}", "--resume"], env=env)
    assert losses(out) == losses(tmp_path / "full") and sorted(losses(out)) == list(range(12))
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    for k in ("model", "ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])


# ----------------------------------------------------------------------------------------------
# The optimisation knobs of the loop: the schedule, gradient accumulation, clipping, the eval batches


def test_lr_schedule_warms_up_then_decays_on_a_cosine():
    cfg = M.Config(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    lr = [trainer.lr_at(cfg, it) for it in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warm-up, never 0
    assert lr[10] == pytest.approx(1.0) and lr[55] == pytest.approx(0.55) and lr[100:] == [0.1] * 20
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # only down after the warm-up
    assert trainer.lr_at(M.Config(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_decay_iters=190), 100) == \
        pytest.approx(0.55)  # --lr_decay_iters stretches the decay past max_iters


class FixedRows:
    """Batches that hand out the same 4 rows in order, batch_size at a time (a step sees all 4)."""

    def __init__(self, rows):
        self.rows, self.at, self.gen = rows, 0, torch.Generator()

    def get(self, split, batch_size, gen=None):
        out = self.rows[self.at:self.at + batch_size]
        self.at = (self.at + batch_size) % len(self.rows)
        return out


def test_a_method_without_published_weights_trains_and_logs_what_its_evaluate_returns(tmp_path):
    """A forker's Config of the shared blocks alone (no hub.PublishedConfig) stopped at trainer.model_to_train's
    read of --init_from and at corpus.eval_batches' of --eval_data, and an evaluate that returned 0-d tensors at
    the log's JSON, after its line was printed."""

    @dataclasses.dataclass
    class Bare(common.PromptConfig, common.TextConfig, common.BaseConfig):
        pass

    cfg = Bare(n_layer=1, n_embd=32, n_head=2, block_size=4, batch_size=4, max_iters=2, eval_interval=2,
               eval_iters=1, device="cpu", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"))
    corpus.write_split(cfg.data_dir, np.arange(300) % 7, np.arange(60) % 7, {"tokenizer": "char", "chars": list("abcdefg"),
                                                                           "vocab_size": 7})
    cfg, model, meta, _ = trainer.model_to_train(cfg, "bare", Bare, {}, lambda c, m: ar.build_model(c, m), lambda c: None)
    trainer.train(cfg, "bare", model, lambda m, x: ar.loss_fn(m, x, 7), lambda m, b: {"val_loss": torch.tensor(1.5)}, meta,
                  FixedRows(torch.arange(16).view(4, 4) % 7))
    assert [r["eval"] for r in log_records(cfg.out_dir) if "eval" in r] == [{"val_loss": 1.5}]
    _, batches, what = corpus.eval_batches(cfg, meta, bos=False)  # --eval's data: the validation split
    assert what == "val" and len(list(corpus.val_batches(batches, cfg, full=True))) == 4  # 15 windows of 4, 4 a batch


def test_grad_accum_and_clip_train_as_one_batch(tmp_path, monkeypatch):
    """--batch_size=2 --grad_accum=2 is one step on the 4 rows of --batch_size=4: the same logged loss and the
    same gradient (clipped to --grad_clip, which is the clip's norm only when the loss is the batch's mean)."""
    import ar
    rows = torch.randint(7, (4, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        params = list(params)
        seen.setdefault("clip", []).append(max_norm)
        seen.setdefault("grad", []).append(torch.cat([p.grad.flatten() for p in params]).clone())
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    for name, bs, accum in (("one", 4, 1), ("two", 2, 2)):
        cfg = ar.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=bs, grad_accum=accum, max_iters=1,
                        eval_interval=1, eval_iters=1, ema=0, grad_clip=0.5, device="cpu", out_dir=str(tmp_path / name))
        torch.manual_seed(0)
        model = ar.build_model(cfg, {"vocab_size": 7})
        trainer.train(cfg, "ar", model, lambda m, x: ar.loss_fn(m, x, 7), lambda m, b: {"val": 0.0}, {"vocab_size": 7},
                      FixedRows(rows))
    losses = [json.loads(line)["loss"] for name in ("one", "two") for line in open(tmp_path / name / "log.jsonl")
              if "loss" in json.loads(line)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert seen["clip"] == [0.5, 0.5] and torch.allclose(*seen["grad"], rtol=1e-4, atol=1e-6)
    seen.clear()
    cfg = ar.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, batch_size=4, max_iters=1, eval_interval=1,
                    eval_iters=1, grad_clip=0, device="cpu", out_dir=str(tmp_path / "noclip"))
    trainer.train(cfg, "ar", ar.build_model(cfg, {"vocab_size": 7}), lambda m, x: ar.loss_fn(m, x, 7),
                  lambda m, b: {"val": 0.0}, {"vocab_size": 7}, FixedRows(rows))
    assert "clip" not in seen  # --grad_clip=0: off


def test_the_eval_batches_during_training_are_the_same_at_every_call(char_data):
    """eval_iters random val batches, distinct within a call and the same at every call, drawn without moving the
    training stream (which a resume must replay)."""
    cfg = M.Config(data_dir=char_data, block_size=16, batch_size=3, eval_iters=4)
    batches = corpus.Batches(cfg, corpus.prepare_data(cfg), seed=0)
    state = batches.gen.get_state()
    first, second = list(corpus.val_batches(batches, cfg)), list(corpus.val_batches(batches, cfg))
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(first[0], b) for b in first[1:])
    assert torch.equal(batches.gen.get_state(), state)


# ----------------------------------------------------------------------------------------------
# The loop's own bookkeeping, on a toy model (one Linear: a decayed matrix and an undecayed bias)


class RandomRows:
    """Batches of random (batch_size, 4) rows drawn from the trainer-seeded .gen; every row drawn is kept."""

    def __init__(self):
        self.gen, self.seen = torch.Generator().manual_seed(99), []

    def get(self, split, batch_size, gen=None):
        x = torch.randn(batch_size, 4, generator=self.gen)
        self.seen.append(x)
        return x


def toy_train(tmp_path, name="run", loss_fn=None, evaluate=None, **kw):
    """trainer.train on a Linear(4, 1) for a few iterations -> (cfg, model, what train returned)."""
    cfg = M.Config(**{"out_dir": str(tmp_path / name), "device": "cpu", "block_size": 4, "batch_size": 2, "max_iters": 3,
                      "eval_interval": 1, "eval_iters": 1, "log_interval": 1, "warmup_iters": 0, "lr": 0.1, "min_lr": 0.1,
                      **kw})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    out = trainer.train(cfg, "mdlm", model, loss_fn or (lambda m, x: m(x).pow(2).mean()),
                        evaluate or (lambda m, b: {"val": 0.0}), {"vocab_size": 7}, RandomRows())
    return cfg, model, out


def test_training_evals_score_the_ema_weights(tmp_path):
    """The periodic evals (and the checkpoint's "val") score the EMA weights that --sample and --eval load, not the
    raw ones; with --ema=0 the trained weights themselves."""
    for ema in (0.5, 0.0):
        seen = []
        record = lambda m, b: seen.append({k: v.clone() for k, v in m.state_dict().items()}) or {"val": 0.0}  # noqa: E731
        cfg, model, out = toy_train(tmp_path, f"ema{ema}", ema=ema, evaluate=record)
        want = model if ema == 0 else out
        assert (out is model) == (ema == 0)
        for k, v in want.state_dict().items():  # the last eval saw the weights train() returns
            assert torch.equal(seen[-1][k], v), (ema, k)
        if ema:
            assert not torch.equal(seen[-1]["weight"], model.weight.detach())


def test_each_training_eval_draws_the_same_noise_and_leaves_trainings_alone(tmp_path):
    """Every eval starts from one fixed seed (the same noise at every call, so evals compare), inside a forked RNG:
    the training draws are those of a run that never evaluates."""
    def noisy_loss(draws):
        def loss_fn(m, x):
            draws.append(torch.rand(()).item())
            return m(x).pow(2).mean()
        return loss_fn

    evals, with_evals, without = [], [], []
    toy_train(tmp_path, "evals", loss_fn=noisy_loss(with_evals), max_iters=4, eval_interval=1,
              evaluate=lambda m, b: evals.append(torch.rand(3)) or {"val": 0.0})
    toy_train(tmp_path, "none", loss_fn=noisy_loss(without), max_iters=4, eval_interval=100)
    assert len(evals) == 4 and all(torch.equal(e, evals[0]) for e in evals)
    assert with_evals == without and len(set(without)) == 4


def test_the_last_iteration_is_always_logged(tmp_path):
    """--log_interval past the run's end: the last iteration's loss line and record still come (the run's final loss)."""
    cfg, *_ = toy_train(tmp_path, max_iters=5, log_interval=3, eval_interval=100)
    assert [r["iter"] for r in log_records(cfg.out_dir) if "loss" in r] == [0, 3, 4]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_nonfinite_loss_stops_and_names_the_last_checkpoint(tmp_path, bad):
    """An infinite loss stops the run as a NaN does; the message names the last checkpoint this run wrote, which is
    kept."""
    calls = []

    def loss_fn(m, x):
        calls.append(1)
        loss = m(x).pow(2).mean()
        return loss * bad if len(calls) == 3 else loss

    with pytest.raises(SystemExit) as e:
        toy_train(tmp_path, loss_fn=loss_fn, max_iters=5, eval_interval=1)
    assert str(e.value).startswith(f"error: loss became {bad} at iteration 2; the last good checkpoint"), str(e.value)
    assert "(iteration 1) is kept" in str(e.value)
    assert common.load_checkpoint(os.path.join(tmp_path, "run", "ckpt.pt"), "mdlm")["iter"] == 1


def test_a_runs_draws_are_decided_by_its_seed_alone(tmp_path):
    """The training noise (torch's generator) and the data stream (a method's own batches' .gen) are seeded from
    --seed by train(), whatever state the caller left them in; another --seed draws others."""
    def run(name, caller_seed, seed):
        draws = []
        batches = RandomRows()
        batches.gen.manual_seed(caller_seed)
        cfg = M.Config(out_dir=str(tmp_path / name), device="cpu", block_size=4, batch_size=2, max_iters=2,
                       eval_interval=100, eval_iters=1, seed=seed)
        torch.manual_seed(caller_seed)
        trainer.train(cfg, "mdlm", torch.nn.Linear(4, 1), lambda m, x: draws.append(torch.rand(())) or m(x).pow(2).mean(),
                      lambda m, b: {"val": 0.0}, {"vocab_size": 7}, batches)
        return torch.stack(draws), torch.cat(batches.seen)

    a, b, c = run("a", 1, 5), run("b", 2, 5), run("c", 1, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the caller's state does not matter
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # --seed does


def test_stale_tmp_checkpoints_of_a_killed_run_are_removed(tmp_path):
    """A run killed inside a checkpoint write leaves ckpt.pt.<host>.<pid>.tmp (as large as the model); the next run
    into the folder removes it, and nothing else."""
    (tmp_path / "ckpt.pt.somehost.4242.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt.pt").write_bytes(b"kept")
    (tmp_path / "notes.tmp").write_bytes(b"kept")
    with trainer.own_out_dir(str(tmp_path)):
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "notes.tmp", "run.lock"]


class FakeClock:
    """time.time() that moves only when a loss is computed: each micro-batch takes one second."""

    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr(trainer.time, "time", lambda: self.now)

    def loss_fn(self, m, x):
        self.now += 1.0
        return m(x).pow(2).mean()


def test_the_logged_rate_counts_every_micro_batchs_tokens(tmp_path, monkeypatch):
    """tok/s is batch_size x block_size x grad_accum tokens per step over the step's time."""
    clock = FakeClock(monkeypatch)
    cfg, *_ = toy_train(tmp_path, loss_fn=clock.loss_fn, grad_accum=3, max_iters=2, eval_interval=100)
    rates = [r["tok_per_s"] for r in log_records(cfg.out_dir) if "loss" in r]
    assert rates == [pytest.approx(2 * 4)] * 2  # 2 x 4 tokens a second, however many micro-batches a step takes


def test_a_resumed_runs_checkpoint_counts_the_time_trained_before(tmp_path, monkeypatch):
    """The checkpoint's "time" goes on from the resumed one's (a second --resume logs on from there, not from 0)."""
    clock = FakeClock(monkeypatch)
    cfg, *_ = toy_train(tmp_path, loss_fn=clock.loss_fn, max_iters=2, eval_interval=2)
    first = common.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "mdlm")["time"]
    assert first == pytest.approx(2.0)
    cfg, *_ = toy_train(tmp_path, loss_fn=clock.loss_fn, max_iters=4, eval_interval=2, resume=True)
    assert common.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "mdlm")["time"] == pytest.approx(4.0)
    times = [r["time"] for r in log_records(cfg.out_dir)]
    assert times == sorted(times) and times[-1] == pytest.approx(4.0)


def test_training_goes_on_in_train_mode_after_an_eval(tmp_path):
    """An evaluate() that puts its model in eval mode (every method's does; under --ema=0 it is the trained model)
    must not leave dropout off for the rest of training."""
    modes = []

    def loss_fn(m, x):
        modes.append(m.training)
        return m(x).pow(2).mean()

    toy_train(tmp_path, loss_fn=loss_fn, ema=0.0, max_iters=3, eval_interval=1, evaluate=lambda m, b: m.eval() and {"val": 0.0})
    assert modes == [True, True, True]


def test_weight_decay_falls_on_the_matrices_only():
    """AdamW's decayed group holds the weight matrices (embeddings, attention, MLP, adaLN's Linear layers); the vectors
    (norm weights, gates, biases) are in the undecayed one."""
    for kw, matrices, vectors in (({}, {"wte.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                                        "blocks.0.mlp.0.weight"}, {"blocks.0.ln1.weight", "blocks.0.gate1", "ln_f.weight"}),
                                  (dict(cond_dim=8, mlp_bias=True), {"blocks.0.ada.weight", "time_mlp.0.weight", "ada_f.weight"},
                                   {"blocks.0.mlp.0.bias", "blocks.0.ada.bias", "ada_f.bias"})):
        model = common.Transformer(11, 1, 2, 32, 16, **kw)
        opt = trainer.make_optimizer(model, M.Config(weight_decay=0.1), torch.device("cpu"))
        names = {id(p): n for n, p in model.named_parameters()}
        decayed, plain = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        assert matrices <= decayed and vectors <= plain, kw
        assert decayed | plain == set(names.values()) and not decayed & plain


def test_sample_and_eval_load_the_ema_weights(run6):
    """A run trained with an EMA is sampled and evaluated with its EMA weights (--ema=0 asks for the trained ones)."""
    src, _ = run6
    ckpt = common.load_checkpoint(os.path.join(src, "ckpt.pt"), "mdlm")
    from mdlm import Config, build_model
    assert ckpt["config"]["ema"] > 0 and any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    for ema, want in ((None, "ema"), (0.0, "model")):
        overrides = {"out_dir": src, **({} if ema is None else {"ema": ema})}
        _, model, *_ = trainer.load_for_inference(Config, overrides, "mdlm", build_model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, ckpt[want][k]), (want, k)


def test_a_config_whose_activations_exceed_the_memory_is_refused():
    """check_memory's lower bound counts 4 bytes for each of a dozen fp32 (batch, block, n_embd) tensors per layer."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_row = 4 * 12 * 1024 * 64  # one sequence of 1024 tokens through one layer of width 64, in bytes
    too_big = M.Config(device="cpu", block_size=1024, n_embd=64, n_layer=1, batch_size=2 * have // per_row)
    with pytest.raises(SystemExit, match="needs at least"):
        trainer.check_memory(too_big)
    trainer.check_memory(M.Config(device="cpu", block_size=1024, n_embd=64, n_layer=1, batch_size=have // per_row // 2))


def test_the_checksum_covers_names_dtypes_and_shapes():
    """A checkpoint's checksum changes with any key's name and with a tensor's dtype or shape, not only with the
    bytes: a damaged name or header with the same bytes behind it is caught too."""
    base = {"model": {"w": torch.zeros(4)}, "iter": 3}
    for other in ({"model": {"v": torch.zeros(4)}, "iter": 3}, {"model": {"w": torch.zeros(4)}, "itex": 3},
                  {"model": {"w": torch.zeros(2, 2)}, "iter": 3}, {"model": {"w": torch.zeros(4, dtype=torch.int32)}, "iter": 3}):
        assert common.checksum(other) != common.checksum(base), other
    assert common.checksum({**base, "checksum": "x"}) == common.checksum(base)  # its own entry aside


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """write_file fsyncs the whole temporary file before renaming it over ckpt.pt, and the folder after: a power cut
    after the rename never leaves a checkpoint whose data had not reached the disk in place of the last good one,
    nor brings the older checkpoint back once the call has returned."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.fstat(fd).st_size))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.getsize(a))), real_replace(a, b))[1])
    path = str(tmp_path / "ckpt.pt")
    for it in range(2):  # a first checkpoint, then one over it
        events.clear()
        common.save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "iter": it})
        size = os.path.getsize(path)
        assert events == [("fsync", size), ("replace", size), ("fsync", "folder")], it
        assert os.listdir(tmp_path) == ["ckpt.pt"] and common.load_checkpoint(path, "mdlm")["iter"] == it


def test_a_kept_record_that_lacked_its_newline_stays_a_line_of_its_own(tmp_path):
    """truncate_log keeps a last whole record written without its newline (cut just after its closing brace) as a
    full line, so the record the resumed run logs next does not join it on one unreadable line."""
    path = str(tmp_path / "log.jsonl")
    with open(path, "w") as f:
        f.write('{"iter": 0, "loss": 4.0}\n{"iter": 1, "loss": 3.0}')
    trainer.truncate_log(path, 1)
    trainer.log_json(path, {"iter": 2, "loss": 2.0})
    with open(path) as f:
        assert [json.loads(line)["iter"] for line in f] == [0, 1, 2]
