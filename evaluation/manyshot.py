"""Many-shot prompts for real LLMs: JSONL rows {question, answer, answer_type} -> token ids + answer spans.

A prompt is a list of demonstrations (question, answer) rendered with the tokenizer's chat template
(user/assistant turns) or, without one, as plain `User: ...` / `Assistant: ...` turns. The answers'
token positions are located exactly: the text is rendered with character ranges of every answer,
tokenized once with offsets, and each answer's tokens are the ones whose characters overlap it.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from user_errors import UserError

FIELDS = ("question", "answer", "answer_type")
FORMATS = ("auto", "chat", "plain")
PLAIN_USER, PLAIN_ASSISTANT, PLAIN_END = "User: ", "\nAssistant: ", "\n\n"
# Private-use characters stand in for the answers while a chat template renders, so that the
# answers' character ranges are known whatever text the template puts around them.
_MARK = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Shot:
    question: str
    answer: str
    answer_type: str


@dataclass(frozen=True)
class ManyShotPrompt:
    """Token ids of one prompt and the token range [start, end) of each demonstration's answer, in order."""

    input_ids: list[int]
    answer_spans: list[tuple[int, int]]


def load_shots(path: str | os.PathLike) -> list[Shot]:
    """Read and validate a JSONL dataset; every line is an object with non-empty string fields FIELDS."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--dataset {path}: no such file; give a JSONL file of rows {{question, answer, answer_type}}")
    shots = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object with fields {', '.join(FIELDS)}")
        for field in FIELDS:
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: row has no '{field}'; every row needs non-empty strings {', '.join(FIELDS)}")
        shots.append(Shot(*(row[field].strip() for field in FIELDS)))
    if not shots:
        raise UserError(f"--dataset {path}: no rows; write one JSON object {{question, answer, answer_type}} per line")
    return shots


def resolve_format(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> str:
    """`auto` is `chat` when the tokenizer has a chat template, else `plain`."""
    if prompt_format not in FORMATS:
        raise UserError(f"--format {prompt_format}: unknown; use one of {', '.join(FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise UserError("--format chat: the tokenizer has no chat template; use --format plain")
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    return prompt_format


def render(tokenizer: PreTrainedTokenizerBase, shots: Sequence[Shot],
           prompt_format: str) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the character range [start, end) of each answer in it."""
    if prompt_format == "plain":
        pieces, before = [], ""
        for shot in shots:
            pieces += [f"{before}{PLAIN_USER}{shot.question}{PLAIN_ASSISTANT}", shot.answer]
            before = PLAIN_END
        return _join([*pieces, PLAIN_END])
    messages = []
    for i, shot in enumerate(shots):
        messages += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": f"\ue000{i}\ue001"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    split = _MARK.split(text)  # text, index, text, index, ..., text
    if [int(i) for i in split[1::2]] != list(range(len(shots))):
        raise UserError("the tokenizer's chat template does not render every assistant turn once, in order; "
                        "use --format plain")
    pieces = [shots[int(piece)].answer if j % 2 else piece for j, piece in enumerate(split)]
    return _join(pieces)


def _join(pieces: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Concatenate text pieces where every odd-numbered piece is an answer; return text and answer ranges."""
    spans, at = [], 0
    for j, piece in enumerate(pieces):
        if j % 2:
            spans.append((at, at + len(piece)))
        at += len(piece)
    return "".join(pieces), spans


def build_prompt(tokenizer: PreTrainedTokenizerBase, shots: Sequence[Shot], prompt_format: str,
                 max_length: int) -> ManyShotPrompt:
    """Tokenize the rendered prompt, locate every answer's tokens, and keep the demonstrations that fit max_length."""
    text, char_spans = render(tokenizer, shots, prompt_format)
    # A chat template writes its own BOS into the text; the plain format needs the tokenizer's.
    try:
        enc = tokenizer(text, add_special_tokens=prompt_format == "plain", return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError("the tokenizer cannot report character offsets; the model directory needs a fast tokenizer "
                        "(tokenizer.json)") from None
    offsets = enc["offset_mapping"]
    token_spans = []
    for j, ((a, b), inside) in enumerate(zip(char_spans, _overlapping_tokens(offsets, char_spans))):
        if not inside:
            raise UserError(f"the tokenizer gives no tokens for the answer of demonstration {j} ({text[a:b]!r}); "
                            "check its files")
        start, end = inside[0], inside[-1] + 1
        covered = text[offsets[start][0] : offsets[end - 1][1]]
        # A token may carry the whitespace before an answer (" Yes"), never other template text.
        if start == 0 or end - start != len(inside) or covered.strip() != text[a:b]:
            raise UserError(
                f"the tokenizer merges the answer of demonstration {j} ({text[a:b]!r}) with the text around it "
                f"({covered!r}); try the other --format"
            )
        token_spans.append((start, end))
    kept = [span for span in token_spans if span[1] <= max_length]
    if not kept:
        raise UserError(f"the first demonstration needs {token_spans[0][1]} tokens, more than the context of "
                        f"{max_length}; raise --max-length or shorten the rows")
    return ManyShotPrompt(list(enc["input_ids"][: kept[-1][1]]), kept)


def _overlapping_tokens(offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """For each (sorted, disjoint) character span, the tokens whose characters overlap it, in one pass."""
    inside: list[list[int]] = [[] for _ in char_spans]
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(char_spans) and char_spans[j][1] <= s:
            j += 1
        if j == len(char_spans):
            break
        if s < e and s < char_spans[j][1] and e > char_spans[j][0]:
            inside[j].append(t)
    return inside


# The chat template of `train_tokenizer(..., chat=True)`, in the shape of real ones (BOS, role markers, turn ends).
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1000, chat: bool = False) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on `texts`, for tests and offline timing of random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    eos = "<|endoftext|>"
    specials = [eos, "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)
    tokenizer.chat_template = TOY_CHAT_TEMPLATE if chat else None
    return tokenizer
