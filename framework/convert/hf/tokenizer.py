"""SentencePiece model -> Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

Built with the `tokenizers` library from the sentencepiece proto so `AutoTokenizer.from_pretrained` needs neither
sentencepiece nor a network. The pipeline mirrors what sentencepiece does for a model trained by
`framework.data.tokenizer.train_tokenizer` (nmt_nfkc normalisation, whitespace trimming and collapsing, a dummy
prefix, split digits, BPE with byte fallback); `check_equivalent` proves it on sample texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.config.errors import ConfigError

# sentencepiece piece types (sentencepiece_model.proto): 3 control, 4 user defined, 6 byte.
_CONTROL, _USER = 3, 4
SPACE = "\u2581"


def _proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def build_hf_tokenizer(spm_path: str | Path) -> Any:
    """A `PreTrainedTokenizerFast` whose ids equal sentencepiece's for `spm_path`."""
    from transformers import PreTrainedTokenizerFast

    proto = _proto(Path(spm_path))
    _check_supported(proto, spm_path)
    backend = _backend(proto, Path(spm_path))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_special_tokens(proto))


def _special_tokens(proto: Any) -> dict[str, str]:
    """pad/eos/unk/bos as the trainer defined them (id < 0 = disabled) and <mask> when the model has it."""
    spec = proto.trainer_spec
    roles = {"pad": (spec.pad_id, spec.pad_piece), "eos": (spec.eos_id, spec.eos_piece)}
    roles |= {"unk": (spec.unk_id, spec.unk_piece), "bos": (spec.bos_id, spec.bos_piece)}
    tokens = {
        f"{role}_token": piece or default for role, (i, piece), default in _with_defaults(roles) if i >= 0
    }
    if any(p.piece == "<mask>" for p in proto.pieces):
        tokens["mask_token"] = "<mask>"
    return tokens


def _with_defaults(roles: dict[str, tuple[int, str]]) -> list[tuple[str, tuple[int, str], str]]:
    # an unset piece name in the proto means sentencepiece's default name
    defaults = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>", "bos": "<s>"}
    return [(role, value, defaults[role]) for role, value in roles.items()]


def _check_supported(proto: Any, path: str | Path) -> None:
    """Refuse sentencepiece settings this converter does not reproduce (rather than write a tokenizer that
    silently gives other ids)."""
    spec = proto.trainer_spec
    wrong = []
    if spec.model_type != 2:
        wrong.append(f"model_type={spec.model_type} (needs BPE=2)")
    if spec.treat_whitespace_as_suffix or not spec.split_by_whitespace:
        wrong.append("whitespace handling other than split_by_whitespace with a prefix marker")
    if wrong:
        raise ConfigError(
            None,
            "data.tokenizer",
            str(path),
            f"cannot convert this sentencepiece model: {', '.join(wrong)}",
            "train the tokenizer with framework.data.tokenizer.train_tokenizer (BPE, default normalisation)",
        )


def _backend(proto: Any, path: Path) -> Any:
    """The `tokenizers.Tokenizer`: the same vocabulary and merges, normaliser, pre-tokeniser and decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(path)).extract(BPE)
    spec = proto.trainer_spec
    model = BPE(
        extracted["vocab"], extracted["merges"], unk_token=spec.unk_piece or "<unk>", fuse_unk=True,
        byte_fallback=spec.byte_fallback,
    )  # fmt: skip
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(proto)
    tokenizer.pre_tokenizer = _pre_tokenizer(proto)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # user-defined pieces (<mask>, sentinels) are matched in the raw text, as sentencepiece matches them
    kinds = {_CONTROL: True, _USER: False}
    tokenizer.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=kinds[p.type])
            for p in proto.pieces
            if p.type in kinds
        ]
    )
    return tokenizer


def _normalizer(proto: Any) -> Any:
    """sentencepiece's order: the character map (nmt_nfkc maps tabs and newlines to spaces; identity has none),
    optional whitespace trimming and collapsing, spaces marked as U+2581, then the dummy prefix (unconditional)."""
    from tokenizers import Regex, normalizers

    norm = proto.normalizer_spec
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", SPACE))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    return normalizers.Sequence(steps)


def _pre_tokenizer(proto: Any) -> Any:
    """Words as sentencepiece splits them: each starts at a U+2581; with allow_whitespace_only_pieces a run of
    them stays with the word that follows (indentation pieces like "▁▁▁▁def")."""
    from tokenizers import Regex, pre_tokenizers

    word = f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+" if proto.trainer_spec.allow_whitespace_only_pieces else None
    if word is None:
        return pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    return pre_tokenizers.Split(Regex(word), behavior="isolated")


def save_hf_tokenizer(spm_path: str | Path, out: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    build_hf_tokenizer(spm_path).save_pretrained(str(out))
