"""Sessions carry the state across turns: three turns give exactly (greedy) the tokens of recomputing the whole
transcript at once; lam.chat streams, /reset forgets, /quit ends, through a pseudo-terminal."""

from __future__ import annotations

import os
import sys
import time

import pexpect
import pytest
import torch

import lam
from lam.chat import HELP, chat, command
from lam.data.tokenizer import CharTokenizer
from lam.models import LAM
from lam.models.attention import LinearAttention, SoftmaxAttention
from lam.serving import model_file
from lam.serving.model import Model
from lam.serving.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz.:")
TURNS = ["the king: ", "and the queen.\nlord: ", "x"]


def model(attention, pos: str, block_size: int = 256) -> Model:
    torch.manual_seed(0)
    net = LAM(TOKENIZER.vocab_size, attention, n_layer=2, n_head=2, n_embd=32, block_size=block_size, pos=pos)
    return Model(net.double(), TOKENIZER, {})  # float64: cached and recomputed logits agree far past an argmax tie


def recomputed(m: Model, turns: list[str], new_tokens: int, frequency: float = 0.0,
               presence: float = 0.0) -> list[list[int]]:
    """Each turn's greedy tokens, from the whole transcript (its last block_size tokens) at every step; a logit
    less `frequency` times its count among the reply's tokens so far, less `presence` if it is among them."""
    ids, replies = [], []
    with torch.no_grad():
        for text in turns:
            ids += TOKENIZER.encode(text)
            reply = []
            for _ in range(new_tokens):
                context = ids[-m.net.max_context:] if m.net.max_context else ids
                logits = m.net(torch.tensor([context]))[0][0, -1].tolist()
                scores = [v - frequency * reply.count(j) - presence * (j in reply) for j, v in enumerate(logits)]
                reply.append(max(range(len(scores)), key=scores.__getitem__))
                ids.append(reply[-1])
            replies.append(reply)
    return replies


@pytest.mark.parametrize("attention, pos, block_size", [
    (LinearAttention, "rope", 256), (SoftmaxAttention, "rope", 256), (SoftmaxAttention, "learned", 40)])
def test_three_turns_give_the_tokens_of_the_whole_transcript(attention, pos, block_size):
    """With learned positions and block_size 40 the transcript outgrows the context: the last 40 tokens."""
    m = model(attention, pos, block_size)
    session = Session(m, max_new_tokens=12, temperature=0)
    replies = [list(session.tokens(TOKENIZER.encode(text))) for text in TURNS]
    assert replies == recomputed(m, TURNS, 12)
    assert len(session.ids) > block_size or pos == "rope"


@pytest.mark.parametrize("frequency, presence", [(0.8, 0.0), (0.0, 1.5), (-1.0, 0.5)])
def test_penalties_count_the_tokens_of_each_reply(frequency, presence):
    m = model(SoftmaxAttention, "rope")
    with torch.no_grad():
        for p in m.net.parameters():  # larger weights than the init's: replies of varied tokens, not one repeated
            p.mul_(8)
    session = Session(m, max_new_tokens=20, temperature=0, frequency_penalty=frequency, presence_penalty=presence)
    replies = [list(session.tokens(TOKENIZER.encode(text))) for text in TURNS]
    assert replies == recomputed(m, TURNS, 20, frequency, presence)
    assert replies != recomputed(m, TURNS, 20)  # the penalties changed what was picked


def shifted(m: Model, turns: list[str], new_tokens: int) -> list[list[int]]:
    """Each turn's greedy tokens under context shift, each from its context recomputed: the context begins at
    `begin`, which moves to the last max_context // 2 tokens whenever the context outgrows max_context (to the
    last max_context when the first pass already does)."""
    limit, ids, replies, begin = m.net.max_context, [], [], 0
    with torch.no_grad():
        for text in turns:
            ids += TOKENIZER.encode(text)
            reply = []
            for _ in range(new_tokens):
                if len(ids) - begin > limit:
                    begin = len(ids) - (limit // 2 if replies or reply else limit)
                reply.append(int(m.net(torch.tensor([ids[begin:]]))[0][0, -1].argmax()))
                ids.append(reply[-1])
            replies.append(reply)
    return replies


@pytest.mark.parametrize("first", [TURNS[0], "the king: " * 5])  # the first pass within block_size, or past it
def test_context_shift_gives_the_tokens_of_its_shifted_contexts(first):
    """Learned positions, block_size 40, 20 tokens a turn: the context shifts several times, in a reply and where
    a turn's text arrives; each token is the one its shifted context gives, recomputed."""
    m = model(SoftmaxAttention, "learned", 40)
    turns = [first, *TURNS[1:]]
    session = Session(m, max_new_tokens=20, temperature=0, context_shift=True)
    replies = [list(session.tokens(TOKENIZER.encode(text))) for text in turns]
    assert replies == shifted(m, turns, 20)
    assert replies != recomputed(m, turns, 20)  # the shifted contexts are shorter than the sliding window's
    assert session.begin > 40 and len(session.ids) - session.begin <= 40


def test_the_last_sampled_token_is_fed_with_the_next_turn():
    m = model(SoftmaxAttention, "rope")
    session = Session(m, max_new_tokens=5, temperature=0)
    list(session.turn(TURNS[0]))
    assert session.fed == len(session.ids) - 1  # sampled, not yet read by the state
    list(session.turn(TURNS[1]))
    assert session.state[0].offset == session.fed == len(session.ids) - 1


def test_a_stop_string_ends_the_turn_and_reset_forgets():
    m = model(LinearAttention, "rope")
    free = "".join(Session(m, max_new_tokens=30, temperature=0).turn("the king: "))
    stop = free[5:7]
    session = Session(m, max_new_tokens=30, temperature=0, stop=stop)
    assert "".join(session.turn("the king: ")) == free[:free.index(stop)]
    session.reset()
    assert session.ids == [] and session.state is None
    session.stop = []
    assert "".join(session.turn("the king: ")) == free


def test_a_command_with_a_value_out_of_range_leaves_the_session_as_it_was():
    session = Session(model(LinearAttention, "rope"), max_new_tokens=30, temperature=0.5, top_k=10)
    kept = (session.temperature, session.top_k, session.max_new_tokens)
    for line, says in [("/temp -1", "temperature must be a finite number >= 0"),
                       ("/temp inf", "temperature must be a finite"), ("/max 0", "max_new_tokens must be"),
                       ("/topk 0", "top_k must be"), ("/temp hot", "/temp takes a number")]:
        assert says in command(session, line)
        assert (session.temperature, session.top_k, session.max_new_tokens) == kept
    assert len(list(session.turn("the king: "))) > 0  # the session still samples
    assert command(session, "/temp 0") == "(temperature 0.0, top_k 10, max 30)" and session.temperature == 0
    assert command(session, "/help") == f"({HELP})" and "/help" in HELP
    assert command(session, "/quit") is None


def test_a_line_the_vocabulary_cannot_read_is_refused_and_the_chat_goes_on():
    session = Session(model(LinearAttention, "rope"), max_new_tokens=5, temperature=0)
    lines, said = iter(["the king", "the k\u00efng", "and"]), []

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    chat(session, read=read, write=lambda text="", **kw: said.append(text))
    refusals = [text for text in said if text.startswith("(")]
    assert len(refusals) == 1 and "\u00ef" in refusals[0]
    assert said.count("lam> ") == 2  # the lines before and after were answered
    expected = Session(model(LinearAttention, "rope"), max_new_tokens=5, temperature=0)
    for text in ("the king\n", "and\n"):
        list(expected.turn(text))
    assert session.ids == expected.ids  # the refused line left the transcript as it was


def terminal(text: str) -> str:
    return text.replace("\r\n", "\n")


@pytest.mark.slow
def test_chat_streams_resets_and_quits_in_a_terminal(tmp_path):
    """Learned positions, block_size 64 and 300 tokens a turn: the session the terminal drives shifts its
    context (context_shift=true), as the one run here does; recomputing the window instead gives other text."""
    m = model(SoftmaxAttention, "learned", block_size=64)
    with torch.no_grad():
        for p in m.net.parameters():  # larger weights than the init's: a reply of varied characters
            p.mul_(8)
    config = {"_target_": "lam.models.LAM", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
              "pos": "learned", "attention": {"_target_": "lam.models.attention.SoftmaxAttention",
                                              "_partial_": True}}
    model_file.save(tmp_path / "m.lam", m.net.float(), TOKENIZER, config, {})
    session = Session(lam.load(tmp_path / "m.lam"), max_new_tokens=300, temperature=0, context_shift=True)
    first, second = "".join(session.turn("the king\n")), "".join(session.turn("and the queen\n"))
    assert len(set(first)) > 5 and first != second
    assert "".join(Session(lam.load(tmp_path / "m.lam"), max_new_tokens=300, temperature=0).turn(
        "the king\n")) != first  # the shift matters to what the terminal shows

    child = pexpect.spawn(sys.executable, ["-m", "lam.chat", f"model={tmp_path / 'm.lam'}", "temperature=0",
                                           "max_new_tokens=300", "threads=1", "context_shift=true"],
                          encoding="utf-8", timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.expect("you> ")
    child.sendline("the king")
    reads, text = [], ""
    while "you> " not in text:  # the reply arrives piece by piece, while it is being sampled
        text += child.read_nonblocking(4096, timeout=60)
        reads.append(time.monotonic())
    assert terminal(text) == f"the king\nlam> {first}\nyou> "
    assert len(reads) > 2 and reads[-1] - reads[0] > 0.05
    child.sendline("and the queen")
    child.expect("you> ")
    assert terminal(child.before) == f"and the queen\nlam> {second}\n"  # continues the transcript
    child.sendline("/reset")
    child.expect("you> ")
    assert "forgotten" in child.before
    child.sendline("the king")
    child.expect("you> ")
    assert terminal(child.before) == f"the king\nlam> {first}\n"  # as from the start
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
