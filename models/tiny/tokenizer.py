"""Build the tiny model's CLIP tokenizer offline from the caption vocabulary.

A byte-level BPE is trained with the ``tokenizers`` library using CLIP's normalisation,
pre-tokenisation and ``</w>`` end-of-word suffix, so every caption word becomes a single
token and any other text still tokenises (into byte-level pieces). Its vocab and merges
are laid out the way OpenAI's CLIP lays out its own (256 byte symbols, the same with
``</w>``, then one entry per merge, then the two special tokens), and a transformers
``CLIPTokenizer`` is built from them. ``vocab.json`` and ``merges.txt`` are saved beside
``tokenizer.json`` so older transformers versions load it too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(words: list[str], model_max_length: int) -> CLIPTokenizer:
    """Train the BPE on ``words`` and wrap it as a ``CLIPTokenizer``."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=10_000,  # an upper bound: training stops when every word is one token
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(words * 4, trainer=trainer)
    state = json.loads(bpe.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]

    byte_chars = _bytes_to_unicode()
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    for m in merges:
        vocab_list.append(m.replace(" ", ""))
    vocab_list += [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))

    with tempfile.TemporaryDirectory() as tmp:
        vf, mf = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vf.write_text(json.dumps(vocab, ensure_ascii=False))
        mf.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(vocab=str(vf), merges=str(mf), model_max_length=model_max_length)
    tok.model_max_length = model_max_length
    return tok


def save_tokenizer(tok: CLIPTokenizer, out_dir: Path) -> None:
    """Save in the modern format plus the legacy ``vocab.json``/``merges.txt`` pair."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    state = json.loads(tok.backend_tokenizer.to_str())
    model = state["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
