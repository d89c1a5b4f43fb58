"""The ``clipkit`` command: ``clipkit VERB [key=value ...]`` with Hydra overrides.

The config is composed with Hydra's compose API (so every rank of a torchrun/SLURM job composes the same
config with no launcher plugin in the way), converted to the typed ``RootConfig`` and validated before any
data, model or process group is built. A config mistake prints one line naming the field and exits with 2.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from clipkit.config import ConfigError, adjust, marked_keys, path_keys, register_configs, validate
from clipkit.data import worker_context
from clipkit.errors import Preempted, UserError
from clipkit.help import VERB_LINES, verb_help

VERBS = tuple(VERB_LINES)
USAGE = (
    "usage: clipkit VERB [key=value ...] [--cfg] [--help]\n\nverbs:\n"
    + "".join(f"  {verb:<7} {line}\n" for verb, line in VERB_LINES.items())
    + """
clipkit VERB --help lists that verb's overrides with their defaults.
overrides are Hydra's: model=vit_b32  data.train='/data/{00000..00099}.tar'  train.steps=1000
  hydra.run.dir=DIR   run directory (default runs/${name}); re-running a command resumes its run
  --cfg               print the resolved config and exit
"""
)
EXIT_CONFIG = 2


def conf_dir() -> Path:
    """The packaged presets (wheel: clipkit/conf) or the source tree's conf/ (checkout, editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "clipkit.yaml").is_file():
            return candidate
    raise FileNotFoundError("clipkit's conf/ presets are missing from this installation")


def _omegaconf_error_line(err: Exception) -> str | None:
    """One line for an OmegaConf error anywhere in the cause chain: ``field=value: reason``."""
    seen = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            msg = str(getattr(seen, "msg", seen)).splitlines()[0]
            value = getattr(seen, "value", None)
            if "not in" in msg or "Key '" in msg:
                return f"{seen.full_key}: unknown key ({msg})"
            return f"{seen.full_key}={value!r}: {msg}" if value is not None else f"{seen.full_key}: {msg}"
        seen = seen.__cause__ or seen.__context__
    return None


def compose(overrides: list[str]):
    """Hydra-composed, typed ``RootConfig`` plus the run dir; raises ``ConfigError`` on any config mistake."""
    register_configs()
    overrides = quoted_words(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="clipkit"):
            raw = hydra_compose(config_name="clipkit", overrides=overrides, return_hydra_config=True)
        run_dir = Path(str(raw.hydra.run.dir))
        with open_dict(raw):
            del raw["hydra"]
        cfg = OmegaConf.to_object(raw)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        line = _omegaconf_error_line(err)
        if line is None:
            text = " ".join(str(err).split())
            line = text.split(" Available options")[0] if "Could not find" in text else text
            if "Could not find" in text and "Available options" in text:
                line += " (available:" + text.split("Available options in")[1].split(":", 1)[1].rstrip() + ")"
        raise ConfigError("config", " ".join(overrides), line) from None
    return cfg, run_dir


def _split_override(arg: str) -> tuple[str, str, str] | None:
    """(prefix, key, value) of a ``[+|++|~]key=value`` override, or None for anything else."""
    m = re.match(r"^(\+\+|\+|~)?([A-Za-z_][\w.\-]*)=(.*)$", arg, flags=re.S)
    return (m[1] or "", m[2], m[3]) if m else None


def _hydra_quoted(value: str) -> str:
    """``value`` as one Hydra quoted string: every character literal except ``${...}`` interpolations."""
    if value == "null" or (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
        return value  # unset, or quoted for Hydra by the user already
    return "'" + value.replace("'", "\\'") + "'"


def quoted_words(args: list[str]) -> list[str]:
    """Overrides of word-valued fields (``metadata=WORD``) quoted for Hydra, whose grammar reads ``false`` and
    ``true`` as booleans: ``train.compile=false`` reaches its field as the word ``false``."""
    words = marked_keys("word")
    out = []
    for arg in args:
        parts = _split_override(arg)
        quote = parts is not None and parts[1] in words and parts[0] != "~"
        out.append(f"{parts[0]}{parts[1]}={_hydra_quoted(parts[2])}" if quote else arg)
    return out


def path_overrides(args: list[str]) -> list[str]:
    """Path-valued overrides as a shell hands them over, made safe for Hydra's grammar.

    - A value with braces, globs, ``::`` or ``@W`` (``data.train=/d/{0..9}.tar`` in single quotes, or a
      user's own Hydra quotes) is quoted for Hydra, which otherwise refuses ``{`` or reads ``,`` as a list.
    - Unquoted braces are expanded by bash into adjacent words, one per shard (``data.train=/d/0.tar
      data.train=/d/1.tar ...``); Hydra would keep only the last. Adjacent repeats of a path key are joined back
      into one brace list; a key given again later keeps Hydra's rule (the last wins).
    """
    keys = path_keys()
    out: list[str] = []
    merged: dict[str, int] = {}  # path key -> its index in out
    values: dict[str, list[str]] = {}
    for arg in args:
        parts = _split_override(arg)
        if parts is None or parts[1] not in keys or parts[0] == "~":
            out.append(arg)
            continue
        prefix, key, value = parts
        if key in merged and merged[key] == len(out) - 1:  # adjacent: words of one shell-expanded pattern
            values[key].append(value)
            joined = "{" + ",".join(values[key]) + "}"
            if any(c in v for v in values[key] for c in "{},"):
                raise ConfigError(
                    key, value, "given several times; quote a brace pattern so the shell passes it as one value"
                )
            out[merged[key]] = f"{prefix}{key}={_hydra_quoted(joined)}"
            continue
        merged[key], values[key] = len(out), [value]
        out.append(f"{prefix}{key}={_hydra_quoted(value)}")
    return out


def _fail(message: str, code: int) -> None:
    print(f"clipkit: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The DeepSpeed launcher appends --local_rank=N; the env carries the same information.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_CONFIG)
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        _fail(f"unknown verb {verb!r} (one of: {', '.join(VERBS)}); see clipkit --help", EXIT_CONFIG)
    if verb == "shards":  # a data utility with its own flags, not a training config
        from clipkit.data.make_shards import main as shards_main

        sys.exit(shards_main(rest))
    if verb == "report":  # reads a finished (or running) run's files; no config
        from clipkit.report import main as report_main

        sys.exit(report_main(rest))
    show_help = "--help" in rest or "-h" in rest
    print_cfg = "--cfg" in rest
    overrides = [a for a in rest if a not in ("--cfg", "--help", "-h")]
    bad = [a for a in overrides if "=" not in a and not a.startswith("~")]
    if bad:
        _fail(f"config error: {bad[0]!r} is not a key=value override", EXIT_CONFIG)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # clipkit never downloads weights at run time
    # clipkit's own messages at INFO; libraries (open_clip's tokenizer chatter, ...) only from WARNING up.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("clipkit").setLevel(logging.INFO)
    try:
        cfg, run_dir = compose(path_overrides(overrides))
        if show_help:  # the values shown are the composed ones (overrides given before --help included)
            print(verb_help(verb, conf_dir(), cfg), end="")
            return
        notes = adjust(cfg)
        validate(cfg, verb)
    except ConfigError as err:
        _fail(f"config error: {err}", EXIT_CONFIG)  # (alone: the adjustment notes matter only for a valid config)
    for note in notes:
        logging.getLogger("clipkit").warning(note)
    if print_cfg:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return
    try:
        _run(verb, cfg, run_dir)
    except ConfigError as err:  # (what only the running process can see: no GPU for train.device=cuda, ...)
        _fail(f"config error: {err}", EXIT_CONFIG)
    except Exception as err:
        message = _user_error(err)
        if message is None or os.environ.get("CLIPKIT_DEBUG"):
            raise  # a bug, not a user's mistake: the traceback is what helps (CLIPKIT_DEBUG=1 shows it always)
        where = f" on rank {os.environ.get('RANK', '0')}" if verb == "train" else ""
        _fail(f"{getattr(err, 'kind', 'error')}{where}: {message}", 1)


def _user_error(err: Exception) -> str | None:
    """One line for what a user's input or machine caused (a file, a checkpoint, the data, the disk: a
    ``UserError`` or an ``OSError``), else None."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return (
            f"no space left on the device writing {err.filename or 'a file'}: free some and run the same command "
            "again (a checkpoint is published only once complete: the last one is intact)"
        )
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    if isinstance(err, (UserError, OSError)):
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _run(verb: str, cfg, run_dir: Path) -> None:
    """The verb's command. Each is imported here, after the config was checked: a mistake is reported before
    torch and open_clip are imported (about 4 s)."""
    if verb == "train":
        _train(cfg, run_dir)
    elif verb == "eval":
        from clipkit.evaluate import evaluate_command

        evaluate_command(cfg, run_dir)
    elif verb == "export":
        from clipkit.export import export_command

        export_command(cfg)
    elif verb == "caption":
        from clipkit.caption import caption_command

        caption_command(cfg)
    elif verb == "embed":
        from clipkit.embed import embed_command

        embed_command(cfg)
    elif verb == "bench":
        from clipkit.bench import bench_command

        run_dir.mkdir(parents=True, exist_ok=True)
        bench_command(cfg, run_dir)


def _train(cfg, run_dir: Path) -> None:
    if cfg.data.workers() or cfg.eval.num_workers:
        worker_context(start=True)  # the workers' fork server imports torch/open_clip while this process does
    from clipkit.distributed import is_peer_failure
    from clipkit.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train(cfg, run_dir)
    except Preempted as sig:
        _fail(
            f"{sig} on rank {os.environ.get('RANK', '0')} while starting or waiting for data: stopped without a new "
            "checkpoint (no step boundary came); the same command resumes from the last complete one",
            128 + sig.signum,
        )
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); the same command resumes from the last complete checkpoint", 130)
    except RuntimeError as err:
        if isinstance(err, UserError) or not is_peer_failure(err):
            raise
        rank = os.environ.get("RANK", "?")
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _fail(
            f"error on rank {rank}: a collective failed or exceeded parallel.timeout_s={cfg.parallel.timeout_s}: "
            f"another rank died, stalled or was killed (see its log); the last complete checkpoint resumes. "
            f"[{first_line}]",
            1,
        )


if __name__ == "__main__":
    main()
