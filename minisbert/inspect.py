"""``python -m minisbert inspect --model M [--json]``: what is inside a checkpoint.

Architecture and the config values that change the numerics, the sentence-transformers settings,
the tokenizer, parameter counts per part, and which checkpoint key fills which of our parameters
(through the loader's own name table, ``io/weights.py``'s ``map_state_dict``: this is what loading does, not a
second copy of it), with the keys the loader deliberately ignores, and the folder's files.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from minisbert.encoder import SentenceEncoder
from minisbert.fast.cpu import cpu_kind
from minisbert.fast.int8 import onednn_int8_usable
from minisbert.io.weights import detect_prefix, map_state_dict, read_state_dict
from minisbert.models import ARCHITECTURES

# Typed-config fields shown for every architecture, in reading order; "head_dim" and "max_tokens"
# are derived.
SUMMARY = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size",
           "vocab_size", "max_position_embeddings", "max_tokens", "type_vocab_size", "layer_norm_eps",
           "norm_eps", "hidden_act", "pad_token_id")
# DeBERTa-v2's relative-attention settings, shown when the config has them.
RELATIVE = ("pos_att_type", "position_buckets", "max_relative_positions", "att_span", "share_att_key",
            "norm_rel_ebd", "position_biased_input", "embedding_size", "conv_kernel_size")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model folder, manifest short name, or hub id")
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object")
    parser.add_argument("--all-keys", action="store_true", help="list every layer's keys (text output)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")


def run(args) -> int:
    info = describe(args.model, revision=args.revision)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_text(info, args.all_keys))
    return 0


# ---------------------------------------------------------------------------------------------------
# Gathering


def describe(name_or_path: str, revision: str | None = None) -> dict:
    """Everything ``inspect`` reports, as a JSON-ready dict."""
    encoder = SentenceEncoder.from_pretrained(name_or_path, revision=revision)
    model, cfg, layout = encoder.model, encoder.model.config, encoder.folder
    weights = layout.weights
    state = read_state_dict(weights)
    sources: dict[str, str] = {}  # our parameter -> checkpoint key, filled by the loader's mapping
    map_state_dict(state, encoder.arch, model, str(weights), sources=sources)

    summary = {name: getattr(cfg, name) for name in SUMMARY if hasattr(cfg, name)}
    summary["head_dim"] = getattr(cfg, "attention_head_size", cfg.hidden_size // cfg.num_attention_heads)
    summary["max_tokens"] = encoder.arch.max_tokens(cfg)
    summary = {name: summary[name] for name in SUMMARY if name in summary}
    relative = {name: getattr(cfg, name) for name in RELATIVE if hasattr(cfg, name)}
    alternating = None
    if hasattr(cfg, "layer_types"):  # ModernBERT: global and sliding-window layers, two rotary bases
        alternating = {"global_layers": [i for i in range(cfg.num_hidden_layers) if cfg.is_global(i)],
                       "local_attention": cfg.local_attention, "window": cfg.window,
                       "global_rope_theta": cfg.global_rope_theta, "local_rope_theta": cfg.local_rope_theta,
                       "biases": {k: getattr(cfg, k) for k in ("attention_bias", "mlp_bias", "norm_bias")}}

    own = model.state_dict()
    mapped = [{"key": sources[ours], "parameter": ours, "shape": list(state[sources[ours]].shape),
               "dtype": _dtype(state[sources[ours]])} for ours in own]  # in the model's data-flow order
    used = set(sources.values())
    ignored = [{"key": k, "shape": list(t.shape), "dtype": _dtype(t)} for k, t in state.items() if k not in used]
    folder = Path(encoder.source)
    return {
        "source": str(folder),
        "model_type": next(k for k, v in ARCHITECTURES.items() if v is encoder.arch),
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "config": summary,
        "relative_attention": relative or None,
        "alternating_attention": alternating,
        "config_all": asdict(cfg),
        "sentence_transformers": {
            "pooling": list(layout.pooling.modes), "normalize": layout.normalize,
            "max_seq_length": encoder.max_seq_length, "do_lower_case": layout.do_lower_case,
            "embedding_dim": encoder.embedding_dim, "truncate_dim": encoder.truncate_dim,
            "similarity_fn_name": encoder.similarity_fn_name,
            "prompts": {k: v for k, v in encoder.prompts.items() if v},
            "default_prompt_name": encoder.default_prompt_name,
            "dense": [asdict(d.config) for d in encoder.dense],
        },
        "tokenizer": _tokenizer_info(encoder.tokenizer, layout.transformer_dir),
        "dtype": {"model": _dtype(next(model.parameters())),
                  "checkpoint": sorted({row["dtype"] for row in mapped})},
        "parameters": _parameter_counts(model),
        "checkpoint": {"file": str(weights.relative_to(folder)) if weights.is_relative_to(folder) else str(weights),
                       "prefix": detect_prefix(state, encoder.arch), "keys": len(state),
                       "mapped": mapped, "ignored": ignored},
        "files": [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size}
                  for p in sorted(folder.rglob("*")) if p.is_file() and ".git" not in p.relative_to(folder).parts],
        "cpu": _cpu_info(),
    }


def _cpu_info() -> dict:
    """This machine's CPU and what it means for the fast modes (bf16, int8): see docs/performance.md."""
    kind = cpu_kind()
    return {"describe": kind.describe(), "native_bf16": kind.native_bf16, "bf16": kind.bf16_advice(),
            "int8": "quantize='int8' (--quantize int8): int8 linears, inexact (cosine >= 0.99 to fp32)"
            + ("" if onednn_int8_usable() else "; oneDNN's int8 kernels do not run here (slow fallback)")}


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _parameter_counts(model: nn.Module) -> dict:
    """Total, per top-level part, and for the blocks the per-block count and its sub-layers."""
    parts: dict[str, int] = {}
    out: dict = {"total": _count(model), "parts": parts}
    for name, child in model.named_children():
        parts[name] = _count(child)
        if isinstance(child, nn.ModuleList) and len(child):
            per_block = [_count(block) for block in child]
            out["blocks"] = {"name": name, "count": len(child), "per_block": per_block[0],
                             "all_equal": len(set(per_block)) == 1,
                             "sub_layers": {n: _count(m) for n, m in child[0].named_children()}}
    direct = sum(p.numel() for p in model.parameters(recurse=False))
    if direct:
        parts["(own parameters)"] = direct
    return out


def _tokenizer_info(tokenizer, folder: Path) -> dict:
    # TextTokenizer wraps a tokenizers.Tokenizer; KoBERT's tokenizer is SentencePiece + vocab.txt.
    if hasattr(tokenizer, "tokenizer"):
        kind = type(tokenizer.tokenizer.model).__name__
        source = next((f for f in ("tokenizer.json", "sentencepiece.bpe.model") if (folder / f).is_file()), "vocab.txt")
        vocab = tokenizer.tokenizer.get_vocab_size()
    else:
        kind, source, vocab = "SentencePiece (KoBERT)", "vocab.txt + *.model", len(tokenizer.vocab)
    return {"kind": kind, "file": source, "vocab_size": vocab, "pad_id": tokenizer.pad_id}


# ---------------------------------------------------------------------------------------------------
# Text output


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _layer_pattern(row: dict) -> tuple[str, str] | None:
    """(checkpoint key, parameter) with the layer index replaced by {i}; None outside the blocks."""
    m = _BLOCK.match(row["parameter"])
    if not m:
        return None
    i = m.group(1)
    return re.sub(rf"\.{i}\.", ".{i}.", row["key"], count=1), _BLOCK.sub("blocks.{i}.", row["parameter"])


def _key_rows(mapped: list[dict], all_keys: bool) -> list[str]:
    layers: dict[int, list] = {}
    for row in mapped:
        m = _BLOCK.match(row["parameter"])
        if m:
            layers.setdefault(int(m.group(1)), []).append(
                (_layer_pattern(row), row["shape"], row["dtype"]))
    # Abbreviate only when every layer has exactly layer 0's keys, shapes and dtypes.
    same = len(layers) > 1 and all(v == layers[0] for v in layers.values())
    width_k = max(len(r["key"]) for r in mapped)
    width_p = max(len(r["parameter"]) for r in mapped)
    lines, said = [f"  {'checkpoint key':<{width_k}}   {'our parameter':<{width_p}}  {'shape':<14} dtype"], False
    for row in mapped:
        m = _BLOCK.match(row["parameter"])
        if m and same and not all_keys and int(m.group(1)) > 0:
            if not said:
                rest = sorted(layers)[1:]
                what = f"layer {rest[0]}" if len(rest) == 1 else f"layers {rest[0]}–{rest[-1]}"
                lines.append(f"  … same for {what} ({len(layers[0])} keys each)")
                said = True
            continue
        shape = str(tuple(row["shape"]))
        lines.append(f"  {row['key']:<{width_k}} → {row['parameter']:<{width_p}}  {shape:<14} {row['dtype']}")
    return lines


def format_text(info: dict, all_keys: bool = False) -> str:
    """The human-readable report; ``all_keys`` lists every layer's checkpoint keys."""
    c, st, tok, params, ck = (info[k] for k in ("config", "sentence_transformers", "tokenizer", "parameters",
                                                 "checkpoint"))
    yes = lambda v: "yes" if v else "no"
    lines = [
        f"model        {info['source']}",
        f"model_type   {info['model_type']} ({info['class']})",
        f"config       hidden {c['hidden_size']} · layers {c['num_hidden_layers']} · heads "
        f"{c['num_attention_heads']} × head dim {c['head_dim']} · FFN {c['intermediate_size']} · "
        f"vocab {c['vocab_size']}",
        f"             max positions {c['max_position_embeddings']} (max tokens {c['max_tokens']}) · "
        + (f"type vocab {c['type_vocab_size']} · " if c.get("type_vocab_size") is not None else "")
        + f"layer_norm_eps {c.get('layer_norm_eps', c.get('norm_eps')):g} · "
        f"activation {c['hidden_act']} · pad id {c['pad_token_id']}",
    ]
    if info["relative_attention"]:
        rel = " · ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in info["relative_attention"].items())
        lines += textwrap.wrap(rel, width=110, initial_indent="relative     ", subsequent_indent=" " * 13)
    if info.get("alternating_attention"):
        a = info["alternating_attention"]
        off = [k.removesuffix("_bias") for k, v in a["biases"].items() if not v]
        lines += [f"attention    global layers {a['global_layers']} · the others local: keys within ±{a['window']} "
                  f"(local_attention {a['local_attention']})",
                  f"             rotary base global {a['global_rope_theta']:g} / local {a['local_rope_theta']:g} · "
                  f"no bias in {', '.join(off) or 'none'}"]
    lines += [
        f"sentence     pooling {'+'.join(st['pooling'])} · normalize {yes(st['normalize'])} · max_seq_length "
        f"{st['max_seq_length']} · do_lower_case {yes(st['do_lower_case'])} · embedding dim {st['embedding_dim']}"
        + (f" (cut to {st['truncate_dim']})" if st["truncate_dim"] else ""),
        f"settings     similarity {st['similarity_fn_name']} · prompts "
        f"{', '.join(f'{k} {v!r}' for k, v in st['prompts'].items()) or 'none'} · default prompt "
        f"{st['default_prompt_name'] or 'none'}",
        *(f"dense        {d['in_features']} -> {d['out_features']} · {d['activation_function'].rsplit('.', 1)[-1]}"
          f"{'' if d['bias'] else ' · no bias'}{' · residual' if d['use_residual'] else ''}" for d in st["dense"]),
        f"tokenizer    {tok['kind']} from {tok['file']} · vocab {tok['vocab_size']} · pad id {tok['pad_id']}",
        f"dtype        model {info['dtype']['model']} · checkpoint {', '.join(info['dtype']['checkpoint'])}",
        f"parameters   {params['total']:,} total",
    ]
    blocks = params.get("blocks")
    for name, n in params["parts"].items():
        if blocks and name == blocks["name"]:
            per = f"{blocks['count']} × {blocks['per_block']:,}" if blocks["all_equal"] else "blocks differ"
            lines.append(f"  {name:<12} {n:>14,}  ({per})")
            subs = " · ".join(f"{k} {v:,}" for k, v in blocks["sub_layers"].items())
            lines.append(f"  {'':<12} {'':>14}  per block: {subs}")
        else:
            lines.append(f"  {name:<12} {n:>14,}")
    lines.append(f"checkpoint   {ck['file']} · {ck['keys']} keys · prefix {ck['prefix'] or '(none)'!s} · "
                 f"{len(ck['mapped'])} loaded, {len(ck['ignored'])} ignored")
    lines += _key_rows(ck["mapped"], all_keys)
    for row in ck["ignored"]:
        shape = str(tuple(row["shape"]))
        lines.append(f"  {row['key']} {shape} {row['dtype']}: ignored (not used by a sentence encoder)")
    total = sum(f["bytes"] for f in info["files"])
    lines.append(f"files        {len(info['files'])} files, {_size(total)}")
    width = max((len(f["path"]) for f in info["files"]), default=0)
    lines += [f"  {f['path']:<{width}}  {_size(f['bytes']):>10}" for f in info["files"]]
    cpu = info["cpu"]
    lines += [f"this CPU     {cpu['describe']}", f"             {cpu['bf16']}", f"             {cpu['int8']}"]
    return "\n".join(lines)
