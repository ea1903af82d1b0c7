"""python -m lam.serve model=shakespeare.lam | ckpt=<run>/checkpoints/best.ckpt [host=127.0.0.1] [port=8000] ...

Serves a model file (lam.export writes one) or a checkpoint of lam.train with uvicorn: a web page at
http://host:port/ and an OpenAI-compatible API under /v1 (completions, chat completions, models; streaming as
server-sent events). The models are not instruction-tuned: the chat endpoint continues a plain "role: content"
transcript.

The keys and their defaults are conf/serve.yaml's. They are read with OmegaConf, not Hydra: `model` is also
Hydra's config group of architectures, so Hydra would take model=FILE for a group choice.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, GrammarParseError

from lam.config import config_dir, report_user_errors, set_threads
from lam.errors import UserError
from lam.generate import load_model
from lam.serving.server import create_app

BOUNDS = {"port": (0, 65535), "max_tokens": (1, 10**9), "max_prompt_tokens": (1, 10**9)}


def read_config(args: list[str]) -> DictConfig:
    """conf/serve.yaml with `key=value` arguments over it; an unknown key or a value out of range is a UserError."""
    cfg = OmegaConf.load(config_dir() / "serve.yaml")
    OmegaConf.set_struct(cfg, True)
    if bad := [a for a in args if "=" not in a]:
        raise UserError(f"arguments are key=value, not {bad[0]!r} (keys: {', '.join(cfg)}; see --help)")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args))
    except (ConfigKeyError, GrammarParseError) as e:
        raise UserError(f"{str(e).splitlines()[0]} (keys: {', '.join(cfg)})") from None
    if (cfg.model is None) == (cfg.ckpt is None):
        raise UserError("give the model to serve: model=<file>.lam (from lam.export) or ckpt=<run>/checkpoints/"
                        "<name>.ckpt, one of them")
    for key, (low, high) in BOUNDS.items():
        if type(cfg[key]) is not int or not low <= cfg[key] <= high:
            raise UserError(f"{key} takes an integer from {low} to {high}, got {cfg[key]!r}")
    return cfg


def check_port_free(host: str, port: int) -> None:
    """A UserError if `port` on `host` cannot be bound (another server holds it), before the model is loaded;
    port 0 (any free port) is always free."""
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"host={host} is not an address of this machine ({e.strerror})") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server holds it): give another port=") \
                from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


@report_user_errors
def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    if {"-h", "--help"} & set(args):
        print(__doc__.strip(), "\n\nKeys (key=value), from conf/serve.yaml:\n")
        print((config_dir() / "serve.yaml").read_text(encoding="utf-8"))
        return
    cfg = read_config(args)
    check_port_free(cfg.host, cfg.port)
    set_threads(cfg.threads)
    model, _ = load_model(cfg.model, cfg.ckpt)
    model_id = cfg.model_id or Path(cfg.model or cfg.ckpt).stem
    app = create_app(model, model_id, max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens)
    if not is_loopback(cfg.host):
        print(f"warning: host={cfg.host} serves the model to anyone who can reach this machine on port {cfg.port}; "
              "there is no authentication", file=sys.stderr)
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    print(f"serving {model_id} at http://{shown}:{cfg.port}/ (the page) and http://{shown}:{cfg.port}/v1 (the API)",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
