"""
The docs name only what exists, and the files keep their line budgets.

check_doc() reads one markdown file (README.md, docs/*.md) and returns its problems:
  - a relative link to a file that does not exist, or an #anchor that no heading of the target
    makes (GitHub's slug rules);
  - a repository path written in code (`data/e2e/prepare.py`, `tests/test_sedd.py`) that does not exist;
  - a --flag in a command (`python X.py ...`, `torchrun ... X.py ...`, in a code block or an inline
    code span) that X.py does not take, and a --flag in the flags table of docs/<method>.md that
    <method>.py does not take;
  - a method command the method's own checks refuse (`--stride` with `--train` only, `--steps=0`);
  - a Config key (`mdlm.Config.steps`, `Config.steps` in docs/mdlm.md) that the Config lacks;
  - a `module.name` (`common.Transformer`) that the module does not define at its top level.
What a script takes is read from its own --help, run in this process: the config keys a method file
lists, its verbs, or the options of an argparse script (bench.py <name>, data/*/prepare.py).
"""
import ast
import contextlib
import functools
import glob
import importlib
import io
import os
import re
import runpy
import shlex
import sys
import tempfile

import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ddpm", "diffusion_lm", "mdlm", "sedd", "diffuser", "ar")
MODULES = METHODS + ("common", "corpus", "trainer", "hub", "difflm_ops", "bench")
VERBS = {"train", "sample", "eval", "help"}
# every docs/<method>.md has exactly these second-level sections, in this order
TEMPLATE = ["The method", "Departures from the paper", "Flags", "Beside its sibling", "Results", "Known limits"]
BUDGET = {**{m + ".py": 700 for m in METHODS}, "common.py": 700, "README.md": 300}
CODE_EXTS = ("py", "md", "cpp", "cu", "h", "png", "ini")
PLACEHOLDERS = {"NAME", "FILE", "DIR", "PATH", "HOST", "X"}  # path segments that stand for the reader's own


def doc_files():
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


# ----------------------------------------------------------------------------------------------
# what a script takes, from its own --help


@functools.lru_cache(maxsize=None)
def help_text(script, sub=""):
    """stdout+stderr of `python script [sub] --help`, run in this process (torch is imported once)."""
    path = os.path.join(ROOT, script)
    argv, path0, out = sys.argv, list(sys.path), io.StringIO()
    sys.argv = [path] + ([sub] if sub else []) + ["--help"]
    sys.path[:0] = [os.path.dirname(path), ROOT]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.argv, sys.path[:] = argv, path0
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def accepted_flags(script, sub=""):
    """The --names `python script [sub]` accepts, or None when the script does not exist."""
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return None
    text = help_text(script, sub)
    if "config keys" in text:  # a method file: common.parse_args lists every key it takes
        keys = set(re.findall(r"^\s+--(\w+)=", text.split("config keys", 1)[1], re.M))
        verbs = set(re.findall(r"--(\w+)", re.search(r"^verbs: (.*)$", text, re.M).group(1)))  # diffusion_lm's own too
        return keys | verbs | {"help"}
    opts = re.findall(r"^\s+(?:-\w[ ,]+)?--([A-Za-z][\w-]*)", text, re.M)  # argparse's option lines
    return set(opts) | {"help"}


@functools.lru_cache(maxsize=None)
def refusal(script, args):
    """The one line a method file's own checks (parse_args, then check_config: before any data or checkpoint is read)
    answer `python script *args` with, or None when they pass it. A --resume, which needs a run to resume, and a
    placeholder value (--steps=N) are not tried; a --device is the reader's machine's, dropped."""
    name = os.path.splitext(script)[0]
    if name not in METHODS or "--resume" in args or any(re.fullmatch(r"--\w+=[A-Z]+", a) for a in args):
        return None
    known = tuple(re.findall(r"--(\w+)", re.search(r"^verbs: (.*)$", help_text(script), re.M).group(1)))
    module, here = importlib.import_module(name), os.getcwd()
    with tempfile.TemporaryDirectory() as empty, torch.random.fork_rng(devices=[]):
        os.chdir(empty)  # no out/<method>/ckpt.pt of an earlier run here decides the config
        try:
            module.check_config(common.parse_args(module.Config, [a for a in args if not a.startswith("--device=")], known)[1])
        except SystemExit as e:
            return str(e) if e.code else None  # --help exits with 0
        finally:
            os.chdir(here)
    return None


@functools.lru_cache(maxsize=None)
def top_level_names(module):
    """Names a module defines at its top level (def, class, assignment, import), or None if absent."""
    path = os.path.join(ROOT, module + ".py")
    if not os.path.isfile(path):
        return None
    names = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


# ----------------------------------------------------------------------------------------------
# reading markdown


def slug(heading):
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def split_markdown(text):
    """(prose lines, fenced code blocks): prose keeps its line structure, code blocks are strings."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                blocks.append("\n".join(block))
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


@functools.lru_cache(maxsize=None)
def anchors(path):
    return anchors_of_text(open(path, encoding="utf-8").read())


def anchors_of_text(text):
    """Every anchor the headings of a markdown text make (duplicates numbered as GitHub does)."""
    prose, _ = split_markdown(text)
    seen, out = {}, set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def code_spans(line):
    return re.findall(r"`([^`]+)`", line)


def logical_lines(block):
    """A code block's lines with backslash continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def commands(line):
    """[(script, sub, args)] for each `python X.py ...` / `torchrun ... X.py ...` in a shell line."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, ""
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote: fall back to plain words
        tokens = line.split()
    out, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("#"):
            break
        if t in ("python", "python3", "torchrun"):
            j = i + 1
            while j < len(tokens) and tokens[j].startswith("-") and t == "torchrun":
                j += 1  # torchrun's own options
            if j < len(tokens) and tokens[j].endswith(".py"):
                script, args = tokens[j], []
                j += 1
                while j < len(tokens) and tokens[j] not in ("&&", "||", "|", ";", "&") and not tokens[j].startswith("#"):
                    args.append(tokens[j])
                    j += 1
                sub = args.pop(0) if args and not args[0].startswith("-") and script.endswith("bench.py") else ""
                out.append((script, sub, args))
                i = j
                continue
        i += 1
    return out


PATH_RE = re.compile(r"(?<![\w./$~-])((?:\.?[\w-]+/)*[\w-]+\.(?:%s))(?![\w/])" % "|".join(CODE_EXTS))
MODULE_RE = re.compile(r"(?<![\w./])(%s)\.([A-Za-z_]\w*)" % "|".join(MODULES))
CONFIG_RE = re.compile(r"(?<![\w.])(?:(%s)\.)?Config\.([A-Za-z_]\w*)" % "|".join(METHODS))


def method_of(doc):
    name = os.path.splitext(os.path.basename(doc))[0]
    return name if os.path.dirname(doc) == "docs" and name in METHODS else None


def check_code(code, doc, problems, flags_of):
    """Commands, repository paths, Config keys and module names in one piece of code."""
    for line in logical_lines(code):
        for script, sub, args in commands(line):
            where = f"python {script}{' ' + sub if sub else ''}"
            ok = flags_of(script, sub)
            if ok is None:
                problems.append(f"{doc}: `{where}` names a file that does not exist")
                continue
            unknown = [name for name in (a[2:].split("=", 1)[0] for a in args if a.startswith("--"))
                       if not {name, name.replace("-", "_"), name.replace("_", "-")} & ok]
            problems.extend(f"{doc}: `{where}` does not take --{name}" for name in unknown)
            # (with a stand-in flags_of, as the checker's own tests pass, the files' real checks do not apply)
            why = None if unknown or flags_of is not accepted_flags else refusal(script, tuple(args))
            if why:
                problems.append(f"{doc}: `{where} {' '.join(args)}` is refused: {why}")
        for path in PATH_RE.findall(line):
            if path.startswith("out/") or set(re.split(r"[/.]", path)) & PLACEHOLDERS:
                continue  # a run's output, or a placeholder such as NAME/ or FILE.py
            if not (os.path.exists(os.path.join(ROOT, path)) or os.path.exists(os.path.join(ROOT, os.path.dirname(doc), path))):
                problems.append(f"{doc}: `{path}` does not exist")
        for module, key in CONFIG_RE.findall(line):
            module = module or method_of(doc)
            pool = [module] if module else list(METHODS)
            if not any(key in (flags_of(m + ".py", "") or ()) for m in pool):
                problems.append(f"{doc}: Config key {key!r} is not a field of {' or '.join(m + '.Config' for m in pool)}")
        for module, name in MODULE_RE.findall(line):
            if name in ("py", "md", "Config"):
                continue
            names = top_level_names(module)
            if names is None:
                problems.append(f"{doc}: `{module}.{name}` names a module {module}.py that does not exist")
            elif name not in names:
                problems.append(f"{doc}: `{module}.{name}`: {module}.py defines no {name}")


def check_doc(text, doc, flags_of=accepted_flags):
    """Problems of one markdown document; doc is its path relative to the repository root."""
    problems = []
    prose, blocks = split_markdown(text)
    for block in blocks:
        check_code(block, doc, problems, flags_of)
    heading, method = "", method_of(doc)
    for line in prose:
        if line.startswith("#"):
            heading = line
        spans = code_spans(line)
        for span in spans:
            check_code(span, doc, problems, flags_of)
        bare = re.sub(r"`[^`]+`", "", line)
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", bare):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), file)) if file else os.path.join(ROOT, doc)
            if file and not os.path.exists(full):
                problems.append(f"{doc}: link to {file} that does not exist")
            elif anchor:
                have = anchors(full) if file else anchors_of_text(text)
                if anchor not in have:
                    problems.append(f"{doc}: link to #{anchor} in {file or doc}, which has no such heading")
        if "flags" in heading.lower() and line.lstrip().startswith("|"):
            first = line.strip().strip("|").split("|")[0]
            pool = [method] if method else list(METHODS)
            for name in re.findall(r"--(\w+)", first):
                if not any(name in (flags_of(m + ".py", "") or ()) for m in pool):
                    problems.append(f"{doc}: flags table names --{name}, which {' or '.join(m + '.py' for m in pool)} does not take")
    return list(dict.fromkeys(problems))  # each problem once, in the order met


# ----------------------------------------------------------------------------------------------
# the docs as they are


@pytest.mark.parametrize("doc", doc_files())
def test_docs_name_only_what_exists(doc):
    problems = check_doc(open(os.path.join(ROOT, doc), encoding="utf-8").read(), doc)
    assert not problems, "\n".join(problems)


def test_sources_cite_only_pages_that_exist():
    """A docstring or comment that sends the reader to a page (docs/sedd.md, README.md) names one the
    repository holds; lower-case names elsewhere are files a run writes (DIR/report.md)."""
    sources = [f for pattern in ("*.py", "csrc/*", "data/*/*.py", "tests/*.py", "tests/*.h")
               for f in sorted(glob.glob(os.path.join(ROOT, pattern))) if not f.endswith("test_docs.py")]
    missing = [f"{os.path.relpath(f, ROOT)}:{n} names {name}"
               for f in sources for n, line in enumerate(open(f, encoding="utf-8"), 1)
               for name in re.findall(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md|METHODS(?= sec))\b", line)
               if (name.startswith("docs/") or name.removesuffix(".md").isupper()) and not os.path.isfile(os.path.join(ROOT, name))]
    assert not missing, "\n".join(missing)


def test_docs_hold_one_page_per_method_on_the_template():
    for m in METHODS:
        path = os.path.join(ROOT, "docs", m + ".md")
        assert os.path.isfile(path), f"docs/{m}.md is missing"
        prose, _ = split_markdown(open(path, encoding="utf-8").read())
        sections = [line[3:].strip() for line in prose if line.startswith("## ")]
        assert sections == TEMPLATE, f"docs/{m}.md has sections {sections}; the template is {TEMPLATE}"
    for page in ("kernels", "results"):
        assert os.path.isfile(os.path.join(ROOT, "docs", page + ".md")), f"docs/{page}.md is missing"


def test_readme_test_command_is_what_ci_runs():
    command = 'pip install -e ".[test]" && python -m pytest -q'
    _, blocks = split_markdown(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())
    assert command in [b.strip() for b in blocks], f"the README's quick start lacks the block: {command}"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert command in [line.strip() for line in ci], f".ci/run does not run the README's test command: {command}"


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_line_budget(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= BUDGET[name], f"{name} has {n} lines; its budget is {BUDGET[name]}"


# ----------------------------------------------------------------------------------------------
# the checker itself catches what it is for


def test_checker_fails_when_a_named_flag_is_removed():
    """Take a flag the README passes to mdlm.py and pretend mdlm.py lost it: the README fails."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    _, blocks = split_markdown(text)
    used = [a[2:].split("=")[0] for b in blocks for line in logical_lines(b) for s, _, args in commands(line)
            if s == "mdlm.py" for a in args if a.startswith("--") and a[2:].split("=")[0] not in VERBS]
    assert used, "the README shows no mdlm.py command with a flag"
    gone = used[0]

    def without(script, sub=""):
        ok = accepted_flags(script, sub)
        return ok - {gone} if script == "mdlm.py" and ok is not None else ok

    assert not [p for p in check_doc(text, "README.md") if f"--{gone}" in p]
    assert [p for p in check_doc(text, "README.md", flags_of=without) if f"does not take --{gone}" in p]


def test_checker_catches_flags_files_keys_and_names():
    doc = "\n".join([
        "# Title", "## Using it", "",
        "```", "python mdlm.py --train --steps=64 --no_such_flag=1   # --not_checked in a comment",
        "torchrun --standalone --nproc_per_node=2 sedd.py --train \\", "    --graph=uniform --no_such_graph=1",
        "python nosuch.py --train", "python bench.py kernels --sizes=1,2,3 --no_such_option",
        "python mdlm.py --train --stride=4", "python sedd.py --sample --steps=0 && python sedd.py --help", "```",
        "Run `python ar.py --sample --also_missing=2`; read `tests/test_nosuch.py` and `tests/test_docs.py`.",
        "`mdlm.Config.steps` exists, `mdlm.Config.no_such_key` does not; `common.Transformer`, `common.no_such_fn`.",
        "## Flags", "| flag | meaning |", "|---|---|", "| `--steps` | steps |", "| `--no_flag_here` | none |",
    ])
    problems = "\n".join(check_doc(doc, "docs/mdlm.md"))
    for bad in ("--no_such_flag", "--no_such_graph", "nosuch.py", "--no_such_option", "--also_missing",
                "tests/test_nosuch.py", "no_such_key", "common.no_such_fn", "--no_flag_here",
                "--train --stride=4` is refused: error: --stride is read by", "--sample --steps=0` is refused: error: --steps=0"):
        assert bad in problems, f"the checker missed {bad}:\n{problems}"
    for good in ("--steps`", "--graph", "--sizes", "tests/test_docs.py", "'steps'", "common.Transformer", "not_checked",
                 "--help", "--train --steps=64"):
        assert good not in problems, f"the checker flagged {good}, which exists:\n{problems}"


def test_checker_catches_links_and_anchors():
    doc = "\n".join([
        "# difflm", "## Using it", "### MDLM (`mdlm.py`)", "## Using it",
        "[a](#using-it) [b](#using-it-1) [c](#mdlm-mdlmpy) [d](#running-on-a-gpu)",
        "[e](docs/no_such_page.md) [f](tests/test_docs.py) [g](https://example.com/x#y)",
        "![h](docs/methods.png) [i](README.md#quick-start) [j](README.md#no-such-section)",
    ])
    problems = "\n".join(check_doc(doc, "README.md"))
    for bad in ("#running-on-a-gpu", "no_such_page.md", "#no-such-section"):
        assert bad in problems, f"the checker missed {bad}:\n{problems}"
    for good in ("#using-it ", "#using-it-1", "#mdlm-mdlmpy", "test_docs.py", "example.com", "methods.png", "#quick-start"):
        assert good not in problems + " ", f"the checker flagged {good}:\n{problems}"


def test_slug_follows_github():
    assert slug("Using it") == "using-it"
    assert slug("MDLM (`mdlm.py`)") == "mdlm-mdlmpy"
    assert slug("What's new? A *bold* [link](x.md)") == "whats-new-a-bold-link"
    assert slug("Fused kernels (csrc/)") == "fused-kernels-csrc"
    assert slug("GPUs and several machines") == "gpus-and-several-machines"
