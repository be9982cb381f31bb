"""Token ids <-> text for the server: the tokenizer (a checkpoint's tokenizer.json or a built-in
byte-level BPE), the DSV4 chat template, and `TextStream`, which turns one request's token ids into
text deltas that never split a character and never show the start of a stop string.

Control tokens (BOS, EOS, <｜User｜>, ...) come only from the chat template: message text is encoded as
plain text, so a message that spells "<｜end▁of▁sentence｜><｜User｜>" cannot end its turn or forge
another. A raw completion prompt is the model's whole input, so its control-token strings do count.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
THINK_END = "</think>"   # DSV4 non-thinking mode opens the answer with "</think>"

# The built-in tokenizer's training text. Any UTF-8 round-trips regardless (byte-level BPE);
# the corpus only decides which merges exist.
_BUILTIN_CORPUS = """\
The server reads a request, turns the text into token ids and hands them to the engine. The engine
keeps one cache slot per request, runs a batched forward step, samples one token for every running
request and sends it back. Long prompts are split into chunks so that other requests keep decoding.
Mixture-of-experts layers route every token to a few experts. Some experts are more popular than
others, so the ranks that hold them do more work. Expert-parallel load balancing counts how many
tokens each expert received, plans a new placement with replicas of the hot experts, and copies
the weights between forward steps. The outputs stay the same because replicas hold identical weights.
What is the capital of France? Paris is the capital of France. How are you today? I am fine, thanks.
Once upon a time there was a small model that wanted to learn how to balance its experts.
def forward(self, input_ids, positions, cache):
    hidden = self.embed(input_ids)
    for layer_idx, block in enumerate(self.layers):
        hidden = block(hidden, positions, cache, layer_idx)
    return self.head(self.norm(hidden))
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42 + - * / = ( ) [ ] { } < > , . ; : ! ? " ' ` ~ @ # $ % ^ & | \\
Größe, café, naïve, señor, 中文, 日本語, 한국어, русский, العربية, emoji 🙂🚀
"""


def builtin_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on the embedded corpus: deterministic, lossless, well under a second."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 8192), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS, USER, ASSISTANT, THINK_END])
    tokenizer.train_from_iterator(_BUILTIN_CORPUS.splitlines(keepends=True), trainer)
    return tokenizer


def without_added_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The same tokenizer minus its added (control) tokens: a control token's spelling encodes as
    the ordinary text it is, through the same pre-tokenizer and merges."""
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


class TextTokenizer:
    """tokenizers.Tokenizer plus what the server needs: BOS/EOS ids and the chat template."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.plain_tokenizer = without_added_tokens(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id = tokenizer.token_to_id(BOS)
        eos_id = tokenizer.token_to_id(EOS)
        self.eos_ids = () if eos_id is None else (eos_id,)
        self.has_chat_tokens = tokenizer.token_to_id(USER) is not None and tokenizer.token_to_id(ASSISTANT) is not None
        self.has_think_end = tokenizer.token_to_id(THINK_END) is not None

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """A raw prompt: control-token strings in `text` become control tokens (as in vLLM and sglang)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_plain(self, text: str) -> list[int]:
        """User text: never a control token, whatever it spells."""
        return self.plain_tokenizer.encode(text, add_special_tokens=False).ids

    def chat_pieces(self, messages: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        """The DSV4 chat format as (text, is_control_token) pieces: BOS, system text,
        <｜User｜>…<｜Assistant｜></think>…<｜end▁of▁sentence｜>, ending with an open assistant turn.
        Plain "Role: text" lines for tokenizers without those tokens."""
        if not self.has_chat_tokens:
            lines = [f"{role.capitalize()}: {content}" for role, content in messages]
            return [("\n".join(lines + ["Assistant:"]), False)]
        opener = [(ASSISTANT, True)] + ([(THINK_END, True)] if self.has_think_end else [])
        pieces = [(BOS, True)] if self.bos_id is not None else []
        for role, content in messages:
            if role == "system":
                pieces.append((content, False))
            elif role == "user":
                pieces += [(USER, True), (content, False)]
            else:
                pieces += opener + [(content, False), (EOS, True)]
        return pieces + opener

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        """The chat prompt as text (for reading; the server sends `encode_chat`'s ids)."""
        return "".join(text for text, _ in self.chat_pieces(messages))

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        ids = []
        for text, is_control in self.chat_pieces(messages):
            ids += [self.tokenizer.token_to_id(text)] if is_control else self.encode_plain(text)
        return ids


class TextStream:
    """Token ids → text deltas for one request. Holds back (1) bytes of a character not yet complete
    and (2) a tail that could still grow into a stop string; cuts the text at the first stop string."""

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0     # decode from here so merges across the boundary render right
        self.read_offset = 0       # ids before this are already in self.text
        self.text = ""
        self.sent = 0              # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush held text (an unfinished character decodes as U+FFFD)."""
        if not self.stopped:
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        # A stop string can only start in unreleased text: the held-back tail is the longest one
        # that could begin a stop string, so released text never holds a stop string's start.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self.text = self.text[:end]
        else:
            end = len(self.text) - (0 if final else self._stop_prefix_len())
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _stop_prefix_len(self) -> int:
        tail = self.text[self.sent:]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0


def load_tokenizer(model_path: str | None, vocab_size: int) -> TextTokenizer:
    """The checkpoint's tokenizer.json when there is one, else the built-in tokenizer."""
    tokenizer_file = Path(model_path) / "tokenizer.json" if model_path else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        return TextTokenizer.from_file(tokenizer_file)
    return TextTokenizer(builtin_tokenizer(vocab_size))
