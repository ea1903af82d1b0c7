"""python -m lam.prepare [data=...] [tokenizer=...] [key=value ...]

Prepares the token cache that `python -m lam.train` with the same overrides would use (conf/prepare.yaml
composes conf/train.yaml) and prints its statistics: documents, characters and tokens per split, characters
per token, the vocabulary, and where the cache is. Writes no run folder.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lam.config import command_line, config_dir, report_user_errors


def statistics(meta: dict, title: str) -> Table:
    """The table of a cache entry's `meta.json`."""
    chars, tokens = meta["characters"], meta["tokens"]
    chars["total"], tokens["total"] = sum(chars.values()), sum(tokens.values())
    table = Table(title=title)
    table.add_column()
    for split in ("train", "val", "total"):
        table.add_column(split, justify="right")
    table.add_row("documents", "", "", f"{meta['documents']:,}")
    table.add_row("characters", *(f"{chars[s]:,}" for s in ("train", "val", "total")))
    table.add_row("tokens", *(f"{tokens[s]:,}" for s in ("train", "val", "total")))
    table.add_row("characters per token", *(f"{chars[s] / max(tokens[s], 1):.2f}" for s in ("train", "val", "total")))
    table.add_row("vocabulary", "", "", f"{meta['vocab_size']:,} ({meta['dtype']})")
    return table


@command_line(corpus=True)
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="prepare")
@report_user_errors
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data)
    choices = HydraConfig.get().runtime.choices
    console = Console()
    console.print(statistics(datamodule.meta, f"data={choices.data} tokenizer={choices.tokenizer}"))
    console.print(f"cache: {datamodule.cache_dir}", soft_wrap=True, highlight=False)


if __name__ == "__main__":
    main()
