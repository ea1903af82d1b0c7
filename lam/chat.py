"""python -m lam.chat model=x.lam | ckpt=PATH: an interactive session that streams each continuation.

Each line typed joins the transcript (with its newline) and the model continues it; the state (KV cache,
recurrent state) is kept across turns. Commands: /reset, /temp T, /topk K|none, /max N, /help, /quit (or Ctrl-D).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lam.config import command_line, config_dir, report_user_errors, set_threads
from lam.errors import UserError
from lam.generate import command_line_stops, load_model
from lam.serving.model import check_sampling, check_switches
from lam.serving.session import Session

HELP = "commands: /reset (forget the transcript), /temp T, /topk K|none, /max N, /help, /quit"


def command(session: Session, line: str) -> str | None:
    """Apply a /command to the session; what to print about it, or None for /quit. A value out of range is
    refused and leaves the session as it was."""
    name, _, value = line.partition(" ")
    value = value.strip()
    settings = {"temperature": session.temperature, "top_k": session.top_k, "max_new_tokens": session.max_new_tokens}
    try:
        if name == "/quit":
            return None
        if name == "/reset":
            session.reset()
            return "(transcript forgotten)"
        if name == "/help":
            return f"({HELP})"
        if name == "/temp":
            settings["temperature"] = float(value)
        elif name == "/topk":
            settings["top_k"] = None if value in ("", "none", "null") else int(value)
        elif name == "/max":
            settings["max_new_tokens"] = int(value)
        else:
            return f"(unknown command {name}; {HELP})"
        check_sampling(settings["max_new_tokens"], settings["temperature"], settings["top_k"], session.top_p,
                       allow_zero_tokens=False)
    except ValueError:
        return f"({name} takes a number, got {value!r})"
    except UserError as e:
        return f"({e})"
    for key, setting in settings.items():
        setattr(session, key, setting)
    return f"(temperature {session.temperature}, top_k {session.top_k}, max {session.max_new_tokens})"


def chat(session: Session, read=input, write=print) -> None:
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("")
            return
        if line.startswith("/"):
            said = command(session, line)
            if said is None:
                return
            write(said)
            continue
        try:
            pieces = session.turn(line + "\n")
        except UserError as e:  # e.g. a character the model's vocabulary lacks: that line is not said
            write(f"({e})")
            continue
        write("lam> ", end="", flush=True)
        for piece in pieces:
            write(piece, end="", flush=True)
        write("")


@command_line()
@hydra.main(version_base="1.3", config_path=str(config_dir() / "apps"), config_name="chat")
@report_user_errors
def main(cfg: DictConfig) -> None:
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, allow_zero_tokens=False,
                   frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty)
    check_switches(context_shift=cfg.context_shift)
    set_threads(cfg.threads)
    model, source = load_model(cfg.model, cfg.ckpt, cfg.device)
    stop = command_line_stops(cfg.stop)
    session = Session(model, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, stop, cfg.seed,
                      cfg.context_shift, cfg.frequency_penalty, cfg.presence_penalty)
    print(f"{source}: {model.summary()}; {HELP}")
    chat(session)


if __name__ == "__main__":
    main()
