#!/usr/bin/env python3
"""Writes tests/golden/tokenizer_smollm2.json: llama.cpp's tokenization of tricky strings, whole
State of the Union addresses and chat prompts with the SmolLM2 vocabulary, for
tests/tokenizer_test.cpp to match token for token; and tests/golden/tokenizer_gemma3.json, the
same for the Gemma 3 SentencePiece vocabulary (every SOTU address by count and hash, a variant
with add_space_prefix = true for Llama 2 style files, Gemma chat prompts), for
tests/tokenizer_spm_test.cpp.

llama.cpp answers through build-ref/tokenize_golden (scripts/ref/tokenize_golden.cpp, built here
against the prebuilt libllama in third_party/llama.cpp). The other pre-tokenizers (llama-bpe,
qwen2, gpt-2, default) are checked on the same vocabulary: the script writes vocab-only copies of
the model with tokenizer.ggml.pre changed, and the test builds the same variants in memory.
Chat prompts are also rendered with jinja2 from the model's own template (the Hugging Face way),
which, unlike llama.cpp's built-in ChatML, adds SmolLM2's default system message.

Texts are stored as base64 so that invalid UTF-8 survives JSON.
    python3 scripts/ref/tokenize_golden.py [smollm2|gemma3]   # default both; needs the models,
                                                              # data/sotu and llama.cpp
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA = ROOT / "third_party" / "llama.cpp"
DRIVER_SRC = ROOT / "scripts" / "ref" / "tokenize_golden.cpp"
DRIVER = ROOT / "build-ref" / "tokenize_golden"
OUT = ROOT / "tests" / "golden" / "tokenizer_smollm2.json"
GEMMA = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
GEMMA_OUT = ROOT / "tests" / "golden" / "tokenizer_gemma3.json"
# Gemma 3's chat template from Hugging Face (google/gemma-3-270m-it, tokenizer_config.json); the
# GGUF file carries none.
GEMMA_TEMPLATE = ROOT / "scripts" / "ref" / "gemma3_chat_template.jinja"
SOTU = ROOT / "data" / "sotu"

# Whole documents with full token lists (small ones, one with non-ASCII punctuation) ...
DOCUMENTS = ["1790_george_washington_n.txt", "2001_george_w_bush_r.txt", "2017_donald_j_trump_r.txt"]
# ... and one long one (~40k tokens) checked by count and hash, also the speed test's input.
HASHED_DOCUMENTS = ["1946_harry_s_truman_d.txt"]

VARIANT_PRES = ["llama-bpe", "qwen2", "gpt-2", "default"]

SOTU_PARAGRAPH = (
    "The state of our Union is strong. Tonight, after a breakthrough year for America, our economy "
    "is growing and creating jobs at the fastest pace since 1999. Our unemployment rate is now lower "
    "than it was before the financial crisis. More of our kids are graduating than ever before; more "
    "of our people are insured than ever before; we are as free from the grip of foreign oil as we've "
    "been in almost 30 years. Tonight, for the first time since 9/11, our combat mission in "
    "Afghanistan is over. Six years ago, nearly 180,000 American troops served in Iraq and "
    "Afghanistan. Today, fewer than 15,000 remain.")

CODE = '''#include <stdio.h>
int main(int argc, char** argv) {
\tfor (int i = 0; i < argc; ++i) printf("%s\\n", argv[i]);  // print args
\treturn 0x1F & ~0;
}
'''

PY_CODE = "def f(x):\n    if x>=10:\n        return x**2  # square\n    return [y for y in range(x)]\n"


def b(s: str) -> bytes:
    return s.encode("utf-8")


# (name, text bytes, add_special, parse_special)
def tricky_cases() -> list[tuple[str, bytes, bool, bool]]:
    c: list[tuple[str, bytes, bool, bool]] = []

    def add(name: str, text: str | bytes, add_special: bool = False, parse_special: bool = True) -> None:
        c.append((name, text if isinstance(text, bytes) else b(text), add_special, parse_special))

    add("empty", "")
    add("empty add_special", "", True, True)
    add("hello", "Hello world")
    add("hello add_special", "Hello world", True, True)
    add("single space", " ")
    add("two spaces", "  ")
    add("leading spaces", "   leading spaces")
    add("trailing spaces", "trailing spaces   ")
    add("space runs", "a  b   c    d     e")
    add("tabs", "\ta\t\tb\t \tc")
    add("newlines", "line1\nline2\n\nline4\n\n\n")
    add("crlf", "line1\r\nline2\r\n\r\nend\r")
    add("mixed whitespace", " \t \n \r\n \u00a0x\u3000y\u2003z \u0085w")
    add("whitespace then digit", "a   1  2 3")
    add("accents", "Café naïve façade résumé Ångström São Paulo")
    add("german", "Größenwahn Straße ÄÖÜ äöü")
    add("cjk", "中文分词测试，日本語のテキスト、한국어 텍스트。")
    add("arabic", "مرحبا بالعالم ١٢٣ السلام عليكم")
    add("hebrew devanagari thai", "שלום עולם नमस्ते दुनिया สวัสดีชาวโลก")
    add("combining marks", "e\u0301 a\u0308 n\u0303o Z\u0351\u0302a\u0328lgo")
    add("cyrillic greek", "Привет мир Ελληνικά ΑΒΓ")
    add("digits", "0123456789")
    add("long number", "The population was 3141592653589793238 in year 2024.")
    add("numbers with separators", "1,234,567.89 and 1.5e-10 and -42 and 3/4 and 100%")
    add("unicode digits", "\u0663\u0664 \u00b2\u00b3 \u2167 \u2460 \uff11\uff12 \u0967\u0968")
    add("digit letter mix", "abc123def 4x4 v2.0.1 H2O CO2")
    add("phone and date", "Call 555-0123 on 2024-03-15 at 09:30.")
    add("contractions", "I'm you're he's she'd we'll they've it't don't can't")
    add("contractions upper", "I'M YOU'RE HE'S SHE'D WE'LL THEY'VE IT'T DON'T")
    add("contractions mixed case", "You'Re we'LL They'Ve 'S 'T 'M 'D")
    add("apostrophes", "'quoted' 'x' '' ''' 'll 've 're rock'n'roll")
    add("curly quotes", "\u2018single\u2019 \u201cdouble\u201d it\u2019s")
    add("punctuation runs", "Wait... what?!?! (yes) [no] {maybe} <tag> --- *** ### !!!")
    add("punctuation space", " . , ; : ! ? ...   ?!")
    add("symbols", "$100 + €50 = £? ¥ © ® ™ § ¶ • … ‰ ← → ≠ ≤ ∞ ∑ √")
    add("math", "f(x) = x^2 + 2*x - 1; ∀x∈ℝ: |x| ≥ 0")
    add("url email", "https://example.com/path?q=1&r=a_b#frag user.name+tag@mail.example.org")
    add("code c", CODE)
    add("code python", PY_CODE)
    add("json", '{"key": [1, 2.5, null, true], "nested": {"a": "b\\n"}}')
    add("html", "<div class=\"x\">Hello &amp; <b>bye</b></div>")
    add("emoji", "I love 🍕 and 🐍! 😀😃😄")
    add("emoji zwj", "👨\u200d👩\u200d👧\u200d👦 👩🏽\u200d💻 🏳️\u200d🌈")
    add("emoji flags modifiers", "🇺🇸🇫🇷 👍🏿 ✌️ ❤️")
    add("zero width", "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom")
    add("private use and unassigned", "\ue000\uf8ff \U000e0001 \U0003134a")
    add("new in unicode 15", "\U00031350\U0002ebf0 \U0001f6dc \U00011f00")
    add("control chars", "a\x00b\x01c\x04d\x06e\x13f\x14g\x16h\x1di\x7fj")
    add("only control chars", "\x04\x06\x13")
    add("astral plane", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐁𝐨𝐥𝐝 𓀀")
    add("plane 4 codepoint", "x\U00040000y\U0007ffffz")
    add("mixed scripts", "English中文Русский123日本語")
    add("repeated chars", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" + "=" * 40 + "-" * 17)
    add("long word", "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism")
    add("mixed case", "camelCaseWord snake_case_word SCREAMING_CASE kebab-case-word")
    add("sotu paragraph", SOTU_PARAGRAPH)
    add("sotu paragraph add_special", SOTU_PARAGRAPH, True, False)

    # Special tokens: parsed and not parsed.
    for parse in (True, False):
        tag = "parsed" if parse else "not parsed"
        add(f"im_start {tag}", "<|im_start|>user\nHi there<|im_end|>\n", False, parse)
        add(f"endoftext {tag}", "Document one.<|endoftext|>Document two.", False, parse)
        add(f"adjacent specials {tag}", "<|im_end|><|im_start|><|endoftext|><|im_end|>", False, parse)
        add(f"special in word {tag}", "abc<|im_end|>def <|im_start|> ghi", False, parse)
        add(f"broken special {tag}", "<|im_start| <|im_end <im_end|> <|IM_END|> <|im_start|", False, parse)
        add(f"other controls {tag}", "<repo_name>x<file_sep><filename>a.py<gh_stars>10<jupyter_code>", False, parse)
    add("special add_special", "<|im_start|>system\nYou are helpful.<|im_end|>\n", True, True)
    add("nested special", "<|im_<|im_end|>start|>", False, True)

    # Invalid UTF-8 (llama.cpp replaces each bad byte with U+FFFD; overlong forms are decoded).
    add("invalid lone continuation", b"abc\x80def\xbf")
    add("invalid truncated 2 byte", b"caf\xc3")
    add("invalid truncated 3 byte", b"euro \xe2\x82 sign")
    add("invalid truncated 4 byte", b"pizza \xf0\x9f\x8d done")
    add("invalid bad lead bytes", b"\xf8\x88\x80\x80\x80 \xfe\xff x")
    add("invalid overlong", b"\xc1\x81\xc0\x80 \xe0\x80\xaf \xf0\x80\x80\x41")
    add("invalid surrogate", b"a\xed\xa0\x80b\xed\xbf\xbfc")
    add("invalid mixed with valid", b"ok \xe4\xb8\xad\xff\xe6\x96\x87 \x80\x80 end")
    add("invalid inside special", b"\xff<|im_end|>\xc3", False, True)
    add("latin1 text", "Café naïve".encode("latin-1"))
    return c


# Inputs llama.cpp cannot tokenize (it throws); recorded so the test pins our chosen behaviour.
ERROR_CASES = [
    ("codepoint above U+10FFFF", b"a\xf4\x90\x80\x80b"),
    ("5-bit lead above range", b"\xf7\xbf\xbf\xbf x"),
]


CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}],
     "add_generation_prompt": False},
    {"messages": [{"role": "system", "content": "You are a terse assistant."},
                  {"role": "user", "content": "Say hi."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Tell me about the State of the Union.\nBe brief."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Sys"},
                  {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}],
     "add_generation_prompt": True},
]


def b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def fnv1a(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def fnv1a_tokens(tokens: list[int]) -> str:
    """FNV-1a over the tokens as little-endian int32."""
    return fnv1a(b"".join((t & 0xFFFFFFFF).to_bytes(4, "little") for t in tokens))


def build_driver() -> None:
    if DRIVER.exists() and DRIVER.stat().st_mtime > DRIVER_SRC.stat().st_mtime:
        return
    DRIVER.parent.mkdir(parents=True, exist_ok=True)
    lib = LLAMA / "lib"
    subprocess.run(["g++", "-O1", "-std=c++17", "-Wall", "-Wextra", "-o", str(DRIVER), str(DRIVER_SRC),
                    "-I", str(LLAMA / "include"), "-L", str(lib), "-l:libllama.v0.5.0.so",
                    "-l:libggml.v0.5.0.so", "-l:libggml-base.so", f"-Wl,-rpath,{lib}", "-ldl"], check=True)


def run_driver(model: Path, cases: list[tuple[bytes, bool, bool]], chats: list[dict],
               template_name: str | None = None) -> dict:
    """template_name: a llama.cpp built-in chat template to use instead of the file's."""
    req = {"cases": [{"text_hex": t.hex(), "add_special": a, "parse_special": p} for t, a, p in cases],
           "chats": chats}
    if template_name:
        req["chat_template"] = template_name
    res = subprocess.run([str(DRIVER), str(model)], input=json.dumps(req).encode(), capture_output=True, check=True)
    return json.loads(res.stdout)


def write_variant(src: Path, dst: Path, pre: str | None = None, overrides: dict | None = None) -> None:
    """A vocab-only copy of src (all metadata, no tensors) with tokenizer.ggml.pre = pre and the
    given keys replaced (same type)."""
    import gguf
    overrides = dict(overrides or {})
    if pre is not None:
        overrides["tokenizer.ggml.pre"] = pre
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = overrides.get(name, field.contents())
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def render_jinja(template: str, chat: dict, **extra) -> str:
    import jinja2

    def raise_exception(msg: str) -> None:
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=chat["messages"],
                                              add_generation_prompt=chat["add_generation_prompt"], **extra)


def smollm2_main() -> None:
    for p in (MODEL, LLAMA / "include" / "llama.h", SOTU):
        if not p.exists():
            sys.exit(f"missing {p} (scripts/fetch_model.sh, scripts/fetch_llamacpp.sh, scripts/fetch_text.sh)")
    build_driver()
    import gguf
    template = gguf.GGUFReader(str(MODEL)).fields["tokenizer.chat_template"].contents()

    tricky = tricky_cases()
    assert len(tricky) >= 60, len(tricky)
    docs = {name: (SOTU / name).read_bytes() for name in DOCUMENTS + HASHED_DOCUMENTS}
    chat_texts = [render_jinja(template, ch) for ch in CHATS]

    # One driver call: tricky cases, the chat prompts (parsed), the documents, the error cases.
    req = [(t, a, p) for _, t, a, p in tricky]
    req += [(b(t), False, True) for t in chat_texts]
    req += [(docs[n], False, True) for n in DOCUMENTS + HASHED_DOCUMENTS]
    req += [(t, False, True) for _, t in ERROR_CASES]
    ans = run_driver(MODEL, req, CHATS)
    results = ans.pop("results")
    llama_chats = ans.pop("chats")

    def take(n: int) -> list[dict]:
        nonlocal results
        out, results = results[:n], results[n:]
        return out

    out: dict = {
        "comment": "Generated by scripts/ref/tokenize_golden.py from llama.cpp (prebuilt libllama); do not edit.",
        "model": MODEL.name,
        "model_sha256": hashlib.sha256(MODEL.read_bytes()).hexdigest(),
        "llama_cpp": json.loads((LLAMA / "llama.cpp.info.json").read_text()),
        "vocab": ans,
    }
    cases = []
    for (name, text, add_special, parse_special), r in zip(tricky, take(len(tricky))):
        if "error" in r:
            sys.exit(f"llama.cpp failed on case {name!r}: {r['error']}")
        cases.append({"name": name, "text_b64": b64(text), "add_special": add_special,
                      "parse_special": parse_special, "tokens": r["tokens"], "detok_b64": b64(bytes.fromhex(r["detok_hex"]))})
    out["cases"] = cases

    chats = []
    for ch, jinja_text, llama_chat, r in zip(CHATS, chat_texts, llama_chats, take(len(CHATS))):
        chats.append({"messages": ch["messages"], "add_generation_prompt": ch["add_generation_prompt"],
                      "jinja": jinja_text, "llama_cpp_builtin": llama_chat.get("text"),
                      "jinja_tokens": r["tokens"]})
    out["chats"] = chats

    documents = []
    for name, r in zip(DOCUMENTS, take(len(DOCUMENTS))):
        documents.append({"file": name, "bytes": len(docs[name]), "fnv1a": fnv1a(docs[name]),
                          "tokens": r["tokens"]})
    for name, r in zip(HASHED_DOCUMENTS, take(len(HASHED_DOCUMENTS))):
        documents.append({"file": name, "bytes": len(docs[name]), "fnv1a": fnv1a(docs[name]),
                          "n_tokens": len(r["tokens"]), "tokens_fnv1a": fnv1a_tokens(r["tokens"])})
    out["documents"] = documents

    # The whole corpus, by count and hash only (~2.4M tokens; the test runs it on request).
    corpus_files = sorted(p.name for p in SOTU.glob("*.txt"))
    corpus_ans = run_driver(MODEL, [((SOTU / f).read_bytes(), False, True) for f in corpus_files], [])["results"]
    out["corpus"] = [{"file": f, "bytes": (SOTU / f).stat().st_size, "fnv1a": fnv1a((SOTU / f).read_bytes()),
                      "n_tokens": len(r["tokens"]), "tokens_fnv1a": fnv1a_tokens(r["tokens"])}
                     for f, r in zip(corpus_files, corpus_ans)]

    errors = []
    for (name, text), r in zip(ERROR_CASES, take(len(ERROR_CASES))):
        errors.append({"name": name, "text_b64": b64(text), "llama_cpp": r.get("error", "no error")})
    out["llama_cpp_errors"] = errors
    assert not results

    # Other pre-tokenizers on the same vocabulary: every tricky case.
    variants = {}
    pretok_cases = tricky
    with tempfile.TemporaryDirectory() as tmp:
        for pre in VARIANT_PRES:
            path = Path(tmp) / f"vocab-{pre}.gguf"
            write_variant(MODEL, path, pre)
            v = run_driver(path, [(t, a, p) for _, t, a, p in pretok_cases], [])
            vres = v.pop("results")
            v.pop("chats")
            vc = []
            for (name, text, a, p), r in zip(pretok_cases, vres):
                if "error" in r:
                    sys.exit(f"llama.cpp ({pre}) failed on case {name!r}: {r['error']}")
                vc.append({"name": name, "text_b64": b64(text), "add_special": a, "parse_special": p,
                           "tokens": r["tokens"]})
            variants[pre] = {"vocab": v, "cases": vc}
    out["pre_variants"] = variants

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, ensure_ascii=True, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)", file=sys.stderr)


# Gemma's own tokens and SentencePiece corner cases, on top of the tricky set.
def gemma_cases() -> list[tuple[str, bytes, bool, bool]]:
    c: list[tuple[str, bytes, bool, bool]] = []

    def add(name: str, text: str | bytes, add_special: bool = False, parse_special: bool = True) -> None:
        c.append((name, text if isinstance(text, bytes) else b(text), add_special, parse_special))

    for parse in (True, False):
        tag = "parsed" if parse else "not parsed"
        add(f"gemma turn {tag}", "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", False, parse)
        add(f"gemma bos eos text {tag}", "<bos>Hello<eos> world</s>", False, parse)
        add(f"gemma unused {tag}", "<unused0> x <unused98><pad><mask>[multimodal]", False, parse)
        add(f"gemma image tokens {tag}", "see <start_of_image> and <end_of_image>.", False, parse)
        add(f"gemma html user tokens {tag}", "<table><tr><td>1</td></tr></table> <b>bold</b> <h1>T</h1>", False, parse)
        add(f"gemma byte token text {tag}", "<0x41><0x0A> <0xff>", False, parse)
    add("gemma turn add_special", "<start_of_turn>user\nHi<end_of_turn>\n", True, True)
    add("gemma text add_special", "Hello world", True, False)
    add("gemma bos text add_special", "<bos>Hello", True, True)
    add("space runs and tabs", "a  b   c\t\td\t \te" + " " * 40 + "f" + "\t" * 35 + "g")
    add("newline runs", "a\n\n\nb" + "\n" * 40 + "c\r\n\r\n")
    add("leading space", " Hello")
    add("leading spaces", "   Hello  world ")
    add("only spaces", "     ")
    add("lower one eighth block", "\u2581x \u2581\u2581 y\u2581")
    add("rare characters", "\U0001d11e \u0f3a \U0001f9ec \u2e3b \uA66E \U00010300")
    add("byte fallback cjk ext", "\U00030000\U0002a700 \U000e0100")
    add("space before special parsed", "a <start_of_turn> b<end_of_turn>c", False, True)
    return c


GEMMA_CHATS = CHATS + [
    {"messages": [{"role": "user", "content": "  Padded question?  \n"},
                  {"role": "assistant", "content": "\tPadded answer.\n\n"},
                  {"role": "user", "content": "Next."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": " Keep the system spaces. "},
                  {"role": "user", "content": "Hi"}],
     "add_generation_prompt": False},
    {"messages": [{"role": "system", "content": "Only a system message."}],
     "add_generation_prompt": True},
]


def vocab_results(model: Path, cases, chats=(), template_name: str | None = None) -> tuple[dict, list, list]:
    req = [(t, a, p) for _, t, a, p in cases]
    res = run_driver(model, req, list(chats), template_name)
    results = res.pop("results")
    chat_res = res.pop("chats")
    return res, results, chat_res


def case_records(cases, results, what: str) -> list[dict]:
    out = []
    for (name, text, add_special, parse_special), r in zip(cases, results):
        if "error" in r:
            sys.exit(f"llama.cpp ({what}) failed on case {name!r}: {r['error']}")
        out.append({"name": name, "text_b64": b64(text), "add_special": add_special, "parse_special": parse_special,
                    "tokens": r["tokens"], "detok_b64": b64(bytes.fromhex(r["detok_hex"])),
                    "detokenize_b64": b64(bytes.fromhex(r["detokenize_hex"]))})
    return out


def gemma3_main() -> None:
    for p in (GEMMA, LLAMA / "include" / "llama.h", SOTU):
        if not p.exists():
            sys.exit(f"missing {p} (scripts/fetch_model.sh gemma3, scripts/fetch_llamacpp.sh, scripts/fetch_text.sh)")
    build_driver()
    template = GEMMA_TEMPLATE.read_text()
    cases = tricky_cases() + gemma_cases()
    chats = GEMMA_CHATS
    chat_texts = [render_jinja(template, ch, bos_token="<bos>") for ch in chats]

    vocab, results, llama_chats = vocab_results(GEMMA, cases + [("chat", b(t), False, True) for t in chat_texts],
                                                chats, "gemma")
    out: dict = {
        "comment": "Generated by scripts/ref/tokenize_golden.py from llama.cpp (prebuilt libllama); do not edit.",
        "model": GEMMA.name,
        "model_sha256": hashlib.sha256(GEMMA.read_bytes()).hexdigest(),
        "llama_cpp": json.loads((LLAMA / "llama.cpp.info.json").read_text()),
        "vocab": vocab,
        "cases": case_records(cases, results[:len(cases)], "gemma3"),
    }
    out["chats"] = [{"messages": ch["messages"], "add_generation_prompt": ch["add_generation_prompt"],
                     "jinja": jt, "llama_cpp_builtin": lc.get("text"), "jinja_tokens": r["tokens"]}
                    for ch, jt, lc, r in zip(chats, chat_texts, llama_chats, results[len(cases):])]

    # Whole documents: two with full token lists, every address by count and hash.
    full = DOCUMENTS[:2]
    _, doc_res, _ = vocab_results(GEMMA, [(n, (SOTU / n).read_bytes(), False, True) for n in full])
    out["documents"] = [{"file": n, "bytes": (SOTU / n).stat().st_size, "fnv1a": fnv1a((SOTU / n).read_bytes()),
                         "tokens": r["tokens"]} for n, r in zip(full, doc_res)]
    corpus_files = sorted(p.name for p in SOTU.glob("*.txt"))
    corpus = run_driver(GEMMA, [((SOTU / f).read_bytes(), False, True) for f in corpus_files], [])["results"]
    out["corpus"] = [{"file": f, "bytes": (SOTU / f).stat().st_size, "fnv1a": fnv1a((SOTU / f).read_bytes()),
                      "n_tokens": len(r["tokens"]), "tokens_fnv1a": fnv1a_tokens(r["tokens"])}
                     for f, r in zip(corpus_files, corpus)]

    # Llama 2 style: the same vocabulary with add_space_prefix = true.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab-space-prefix.gguf"
        write_variant(GEMMA, path, overrides={"tokenizer.ggml.add_space_prefix": True})
        v, vres, _ = vocab_results(path, cases)
        out["space_prefix_variant"] = {"vocab": v, "cases": case_records(cases, vres, "space prefix")}

    GEMMA_OUT.write_text(json.dumps(out, ensure_ascii=True, separators=(",", ":")) + "\n")
    print(f"wrote {GEMMA_OUT} ({GEMMA_OUT.stat().st_size} bytes, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    which = sys.argv[1:] or ["smollm2", "gemma3"]
    for w in which:
        {"smollm2": smollm2_main, "gemma3": gemma3_main}[w]()
