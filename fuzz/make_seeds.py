#!/usr/bin/env python3
"""Writes the small seed corpora of the fuzz harnesses (fuzz/corpus/<harness>/), a few valid
inputs per format for libFuzzer to mutate. Deterministic; no model weights.

  python3 fuzz/make_seeds.py [--out fuzz/corpus]
"""
import argparse
import json
import os
import struct
import zlib

import numpy as np
import gguf


def byte_pieces():
    # GPT-2's byte-to-unicode alphabet: printable bytes stand for themselves, the rest are
    # shifted to U+0100 and up, so each of the 256 bytes is one vocabulary string.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return [table[b] for b in range(256)]


def write_gguf(path, with_tokenizer, tensor_types):
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.context_length", 64)
    w.add_uint32("llama.embedding_length", 32)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_array("seed.int_array", [1, 2, 3])
    w.add_array("seed.float_array", [0.5, -1.0])
    w.add_bool("seed.flag", True)
    if with_tokenizer:
        pieces = byte_pieces()
        merges = ["Ġ t", "h e", "Ġt he", "i n"]
        pieces += ["Ġt", "he", "Ġthe", "in", "<|im_start|>", "<|im_end|>"]
        types = [1] * (len(pieces) - 2) + [3, 3]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(pieces)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(len(pieces) - 2)
        w.add_eos_token_id(len(pieces) - 1)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)
    for i, qtype in enumerate(tensor_types):
        x = rng.standard_normal((2, 32)).astype(np.float32)
        data = gguf.quants.quantize(x, qtype) if qtype not in (gguf.GGMLQuantizationType.F32,) else x
        w.add_tensor(f"t{i}", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_filters(path, metadata, dtype="F32", shape=(2, 2, 4)):
    n = int(np.prod(shape))
    data = np.linspace(-1, 1, n, dtype=np.float32)
    raw = data.astype(np.float16).tobytes() if dtype == "F16" else data.tobytes()
    header = {"q_filters": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(raw)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw)


# Session state files (src/kv/state_file.h), written here from the format's description: an
# independent encoder, so tests/fuzz_replay_test.cpp can check the C++ reader against it.
GGML_ROW = {0: lambda d: 4 * d, 1: lambda d: 2 * d, 30: lambda d: 2 * d, 8: lambda d: 34 * d // 32, 2: lambda d: 18 * d // 32}


def state_file(*, types=(0, 0), policy="none", params=(0, 0, 0, 0.0, 0, 0, 0, 0, 0), filters_hash="",
               stats=(False, False, 0, False, False), n_past=6, prompt_end=None, tokens=True, policy_state="", keep=None,
               n_layers=2, n_kv_heads=2, head_dim=32, version=4, query_recent=0, layer_weights=()):
    rng = np.random.default_rng(len(policy) + n_past)
    i64 = lambda v: struct.pack("<q", v)
    text = lambda t: struct.pack("<Q", len(t.encode())) + t.encode()
    budget, window, evict_every, ratio, skip_layers, seed, n_sink, snap_window, snap_kernel = params
    accumulate, last_query, stats_window, query_moments, key_scores = stats
    prompt_end = n_past if prompt_end is None else prompt_end
    body = text("0123456789abcdef") + text(f"llama:L{n_layers}:H4:KV{n_kv_heads}:D{head_dim}:E64:V300")
    body += i64(n_layers) + i64(n_kv_heads) + i64(head_dim) + struct.pack("<II", *types) + text(policy)
    body += i64(budget) + i64(window) + i64(evict_every) + struct.pack("<f", ratio) + i64(skip_layers)
    body += struct.pack("<Q", seed) + i64(n_sink) + i64(snap_window) + i64(snap_kernel) + text(filters_hash)
    body += struct.pack("<BB", accumulate, last_query) + i64(stats_window) + struct.pack("<BB", query_moments, key_scores)
    if version >= 3:  # the recent-query horizon (qfilters_adaptive); version 2 had none
        body += i64(query_recent)
    if version >= 4:  # per-layer budget weights, length-prefixed (0 = uniform); version 3 had none
        body += struct.pack("<Q", len(layer_weights)) + struct.pack(f"<{len(layer_weights)}f", *layer_weights)
    body += i64(n_past) + i64(prompt_end) + i64(3 * n_past) + i64(7) + i64(2)
    toks = list(range(10, 10 + n_past)) if tokens else []
    body += struct.pack("<Q", len(toks)) + struct.pack(f"<{len(toks)}i", *toks) + text(policy_state)
    for _ in range(n_layers * n_kv_heads):
        pos = sorted(rng.choice(n_past, size=keep, replace=False)) if keep else list(range(n_past))
        n = len(pos)
        body += i64(n) + rng.integers(0, 256, n * GGML_ROW[types[0]](head_dim), dtype=np.uint8).tobytes()
        body += rng.integers(0, 256, n * GGML_ROW[types[1]](head_dim), dtype=np.uint8).tobytes()
        body += struct.pack(f"<{n}i", *pos)
        if accumulate or stats_window > 0:
            body += rng.random(n, dtype=np.float32).tobytes()
        if accumulate:
            body += struct.pack(f"<{n}i", *range(n))
        if last_query:
            body += rng.random(n, dtype=np.float32).tobytes()
        if key_scores:
            body += rng.standard_normal(n, dtype=np.float32).tobytes()
    if query_moments or query_recent > 0:  # per layer: 4 query heads x head_dim, count, then
        for layer in range(n_layers):       # sums and outer sums (float64), recent queries
            body += i64(4) + i64(head_dim) + i64(n_past)
            if query_moments:
                body += rng.standard_normal(4 * head_dim).tobytes() + rng.standard_normal(4 * head_dim * head_dim).tobytes()
            if query_recent > 0:  # length-prefixed recent queries: 4 x head_dim float64
                body += struct.pack("<Q", 4 * head_dim) + rng.standard_normal(4 * head_dim).tobytes()
    prefix = b"QFKVSTAT" + struct.pack("<IIQII", version, 0, len(body), zlib.crc32(body), 0)
    return prefix + body


def write(path, data):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def server_request_seeds(out):
    """Bodies for /v1/chat/completions, /v1/completions, /tokenize and /detokenize: valid ones
    with every field, one valid for all four endpoints, and the kinds of bad input a server sees."""
    chat = {
        "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                                   {"role": "assistant", "content": None}, {"role": "developer", "content": "x"}],
        "max_tokens": 12, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1, "seed": 3,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repeat_penalty": 1.1, "repeat_last_n": 32,
        "stop": ["\n\n", "END"], "stream": True, "stream_options": {"include_usage": True}, "n": 1, "logprobs": False,
        "cache_prompt": False, "id_slot": 1, "ignore_eos": True,
        "kv_policy": "knorm", "kv_budget": 64, "kv_window": 8, "kv_evict_every": 4, "kv_ratio": 0.5,
        "kv_skip_layers": 2, "kv_positions": "keep"}
    bodies = {
        "chat_every_field.json": json.dumps(chat),
        "chat_minimal.json": json.dumps({"messages": [{"role": "user", "content": "Hello"}]}),
        "completion_text.json": json.dumps({"prompt": "The end. THE END", "stop": ["END", "e", ""], "n_predict": -1}),
        "completion_ids.json": json.dumps({"prompt": [1, 2, 3, 49151], "max_completion_tokens": 5, "kv_policy": "none"}),
        "completion_one_string.json": json.dumps({"prompt": ["<|im_start|>user\nhi<|im_end|>"], "stop": "hi"}),
        "tokenize.json": json.dumps({"content": "héllo <|im_end|> 🙂", "add_special": True, "with_pieces": True},
                                    ensure_ascii=False),
        "detokenize.json": json.dumps({"tokens": [1, 2, 3, 4, 0]}),
        "all_endpoints.json": json.dumps({"messages": [{"role": "user", "content": "a"}], "prompt": "b",
                                          "content": "c", "tokens": [5]}),
        "top_p_bound.json": json.dumps({"prompt": "x", "top_p": 1e-6, "temperature": 100, "repeat_penalty": 1e-3}),
        # Refused (400), each for one reason.
        "not_json.txt": "{not json",
        "empty.txt": "",
        "truncated.json": json.dumps(chat)[:100],
        "invalid_utf8.json": b'{"prompt": "\xff\xfe bad", "content": "\xc3("}',
        "lone_surrogate.json": '{"prompt": "\\ud800", "content": "\\udfff x"}',
        "number_beyond_double.json": '{"prompt": "x", "max_tokens": 1e400}',
        "seed_two_to_63.json": '{"prompt": "x", "seed": 9223372036854775808.0}',
        "integers_beyond_int64.json": '{"prompt": [18446744073709551615], "tokens": [18446744073709551615], "max_tokens": 18446744073709551616}',
        "wrong_types.json": json.dumps({"messages": [{"role": "user", "content": [{"type": 5, "text": "x"}]}],
                                        "content": "x", "add_special": "yes", "tokens": "1 2"}),
        "unsupported.json": json.dumps({"prompt": "x", "n": 2, "logprobs": True, "tools": []}),
        "deep_array.json": "[" * 5000 + "]" * 5000,
        "deep_messages.json": '{"messages": ' + "[" * 3000 + "]" * 3000 + ', "content": ' + '{"a":' * 2000 + "1" + "}" * 2000 + "}",
    }
    for name, body in bodies.items():
        write(os.path.join(out, "server_request", name), body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus"))
    out = ap.parse_args().out
    for d in ("gguf", "filter_file", "tokenizer", "chat_template", "state_file", "server_request"):
        os.makedirs(os.path.join(out, d), exist_ok=True)

    Q = gguf.GGMLQuantizationType
    write_gguf(os.path.join(out, "gguf", "tokenizer.gguf"), True, [Q.F32])
    write_gguf(os.path.join(out, "gguf", "tensors.gguf"), False, [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])

    ours = {"format": "qfilters", "sign_convention": "keep_largest_dot", "layout": "gguf", "fingerprint": "llama/2/4/2/4"}
    write_filters(os.path.join(out, "filter_file", "qfilters.safetensors"), ours)
    write_filters(os.path.join(out, "filter_file", "foreign_f16.safetensors"), None, dtype="F16")
    write_filters(os.path.join(out, "filter_file", "wrong_shape.safetensors"), ours, shape=(3, 2, 4))

    # State files: valid_* must decode (tests/fuzz_replay_test.cpp checks it) and encode back to the
    # same bytes; version2_* and version3_* (older versions) must decode; the others must not.
    st = os.path.join(out, "state_file")
    write(os.path.join(st, "valid_full_f32.qfstate"), state_file(n_past=4))
    write(os.path.join(st, "valid_h2o_q8_q4.qfstate"),
          state_file(types=(8, 2), policy="h2o", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(True, False, 0, False, False), keep=3))
    write(os.path.join(st, "valid_tova_f16_no_tokens.qfstate"),
          state_file(types=(1, 30), policy="tova", params=(4, 1, 2, 0.0, 1, 0, 4, 64, 5), stats=(False, True, 0, False, False),
                     tokens=False, keep=4))
    write(os.path.join(st, "valid_snapkv_ratio.qfstate"),
          state_file(policy="snapkv", params=(0, 0, 1, 0.5, 0, 0, 4, 8, 5), stats=(False, False, 8, False, False), keep=3, prompt_end=5))
    write(os.path.join(st, "valid_random_state.qfstate"),
          state_file(policy="random", params=(3, 1, 1, 0.0, 0, 42, 4, 64, 5), policy_state="5489 1 2 3", keep=3))
    write(os.path.join(st, "valid_qfilters.qfstate"),
          state_file(types=(1, 1), policy="qfilters", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5),
                     filters_hash="00112233aabbccdd", stats=(False, False, 0, False, True), keep=3))
    write(os.path.join(st, "valid_knorm_q8_key_scores.qfstate"),
          state_file(types=(8, 8), policy="knorm", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(False, False, 0, False, True), keep=3))
    write(os.path.join(st, "valid_expected_attention.qfstate"),
          state_file(policy="expected_attention", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(False, False, 0, True, False), keep=3, head_dim=8))
    write(os.path.join(st, "valid_qfilters_adaptive.qfstate"),
          state_file(policy="qfilters_adaptive", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), filters_hash="0011223344556677",
                     stats=(False, False, 0, False, False), keep=3, head_dim=8, query_recent=16))
    write(os.path.join(st, "valid_tova_layer_weights.qfstate"),
          state_file(policy="tova", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(False, True, 0, False, False), keep=3,
                     layer_weights=(1.5, 0.5)))
    write(os.path.join(st, "version3_qfilters_adaptive.qfstate"),
          state_file(policy="qfilters_adaptive", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), filters_hash="0011223344556677",
                     stats=(False, False, 0, False, False), keep=3, head_dim=8, query_recent=16, version=3))
    write(os.path.join(st, "bad_layer_weight_count.qfstate"),
          state_file(policy="tova", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(False, True, 0, False, False), keep=3,
                     layer_weights=(1.0, 1.0, 1.0)))
    write(os.path.join(st, "bad_layer_weight_zero.qfstate"),
          state_file(policy="tova", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(False, True, 0, False, False), keep=3,
                     layer_weights=(1.0, 0.0)))
    write(os.path.join(st, "version2_expected_attention.qfstate"),
          state_file(policy="expected_attention", params=(3, 1, 1, 0.0, 0, 0, 4, 64, 5), stats=(False, False, 0, True, False),
                     keep=3, head_dim=8, version=2))
    truncated = state_file(n_past=3)
    write(os.path.join(st, "truncated.qfstate"), truncated[: len(truncated) - 9])

    texts = {
        "english.txt": "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
        "numbers.txt": "3.14159 + 1234567890 = 42\t\n  x",
        "unicode.txt": "héllo wörld — 日本語のテキスト 🙂 Ελληνικά",
        "chatml.txt": "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "code.txt": "def f(x):\n    return x ** 2  # square\n",
    }
    for name, text in texts.items():
        write(os.path.join(out, "tokenizer", name), text)
    write(os.path.join(out, "tokenizer", "invalid_utf8.bin"), b"ab\xff\xc3(\xe2\x82 \xf0\x9f\x99")

    smollm_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                       "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
                       "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                       "{% endfor %}")
    write(os.path.join(out, "chat_template", "smollm.bin"), smollm_template + "\0user\0Hello\0assistant\0Hi there")
    write(os.path.join(out, "chat_template", "chatml_name.bin"), "chatml\0system\0Be brief.\0user\0Why?")
    write(os.path.join(out, "chat_template", "unsupported.bin"), "{{ bos_token }}[INST] {{ m }} [/INST]\0user\0x")
    server_request_seeds(os.path.join(out))


if __name__ == "__main__":
    main()
