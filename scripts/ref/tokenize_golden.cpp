// tokenize_golden: llama.cpp's side of tests/golden/tokenizer_smollm2.json. Loads a GGUF's
// vocabulary (vocab_only) with the prebuilt libllama and answers one JSON request on stdin:
//   {"cases": [{"text_hex": "...", "add_special": bool, "parse_special": bool}, ...],
//    "chats": [{"messages": [{"role": "...", "content": "..."}], "add_generation_prompt": bool}],
//    "chat_template": "gemma"}   (optional: a built-in template name instead of the file's)
// with one JSON object on stdout: vocabulary facts (bos, eos, eog ids, a hash of every token's
// piece), and per case the tokens (or the exception llama.cpp threw), the concatenated pieces and
// llama_detokenize's text (which drops the leading space add_space_prefix put in).
// Texts travel as hex so that invalid UTF-8 survives JSON. Driven and built by
// scripts/ref/tokenize_golden.py; never part of the qfilters build.
//
//   tokenize_golden MODEL.gguf < request.json > answer.json

#include <cstdint>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "llama.h"

namespace {

using json = nlohmann::json;

std::string from_hex(const std::string& hex) {
  if (hex.size() % 2) throw std::runtime_error("odd hex length");
  std::string out;
  for (size_t i = 0; i < hex.size(); i += 2) out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::string to_hex(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

std::string piece(const llama_vocab* vocab, llama_token t) {
  std::string buf(64, '\0');
  int n = llama_token_to_piece(vocab, t, buf.data(), static_cast<int32_t>(buf.size()), 0, /*special=*/true);
  if (n < 0) {
    buf.resize(-n);
    n = llama_token_to_piece(vocab, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
  }
  buf.resize(n);
  return buf;
}

std::string detokenize(const llama_vocab* vocab, const std::vector<llama_token>& toks) {
  std::string buf(toks.size() * 16 + 16, '\0');
  int32_t n = llama_detokenize(vocab, toks.data(), static_cast<int32_t>(toks.size()), buf.data(),
                               static_cast<int32_t>(buf.size()), /*remove_special=*/false, /*unparse_special=*/true);
  if (n < 0) {
    buf.resize(-n);
    n = llama_detokenize(vocab, toks.data(), static_cast<int32_t>(toks.size()), buf.data(),
                         static_cast<int32_t>(buf.size()), false, true);
  }
  buf.resize(n);
  return buf;
}

// FNV-1a over (u32 length, bytes) of every piece: a cheap fingerprint of the whole decode table.
uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL.gguf < request.json\n", argv[0]);
    return 2;
  }
  llama_log_set([](ggml_log_level level, const char* text, void*) {
    if (level >= GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
  }, nullptr);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.vocab_only = true;
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) {
    std::fprintf(stderr, "failed to load %s\n", argv[1]);
    return 1;
  }
  const llama_vocab* vocab = llama_model_get_vocab(model);
  // Read stdin whole first: parsing straight from istreambuf_iterator spins in libstdc++ 12.
  const std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  const json req = json::parse(input);

  json out;
  const int32_t n_vocab = llama_vocab_n_tokens(vocab);
  out["n_vocab"] = n_vocab;
  out["bos"] = llama_vocab_bos(vocab);
  out["eos"] = llama_vocab_eos(vocab);
  out["add_bos"] = llama_vocab_get_add_bos(vocab);
  out["add_eos"] = llama_vocab_get_add_eos(vocab);
  json eog = json::array();
  uint64_t h = 0xcbf29ce484222325ull;
  for (llama_token t = 0; t < n_vocab; ++t) {
    if (llama_vocab_is_eog(vocab, t)) eog.push_back(t);
    const std::string p = piece(vocab, t);
    const uint32_t len = static_cast<uint32_t>(p.size());
    h = fnv1a(h, &len, sizeof len);
    h = fnv1a(h, p.data(), p.size());
  }
  out["eog"] = eog;
  char hash[17];
  std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(h));
  out["pieces_fnv1a"] = hash;

  json results = json::array();
  for (const auto& c : req.value("cases", json::array())) {
    const std::string text = from_hex(c.at("text_hex").get<std::string>());
    const bool add_special = c.at("add_special").get<bool>();
    const bool parse_special = c.at("parse_special").get<bool>();
    json r;
    try {
      const int32_t len = static_cast<int32_t>(text.size());
      int32_t n = llama_tokenize(vocab, text.data(), len, nullptr, 0, add_special, parse_special);
      std::vector<llama_token> toks(n < 0 ? -n : n);
      n = llama_tokenize(vocab, text.data(), len, toks.data(), static_cast<int32_t>(toks.size()), add_special,
                         parse_special);
      if (n < 0) throw std::runtime_error("llama_tokenize size changed");
      toks.resize(n);
      std::string detok;
      for (llama_token t : toks) detok += piece(vocab, t);
      r["tokens"] = toks;
      r["detok_hex"] = to_hex(detok);
      r["detokenize_hex"] = to_hex(detokenize(vocab, toks));
    } catch (const std::exception& e) {
      r["error"] = e.what();
    }
    results.push_back(r);
  }
  out["results"] = results;

  json chats = json::array();
  const std::string tmpl_name = req.value("chat_template", std::string());
  const char* tmpl = tmpl_name.empty() ? llama_model_chat_template(model, nullptr) : tmpl_name.c_str();
  for (const auto& c : req.value("chats", json::array())) {
    std::vector<std::string> roles, contents;
    for (const auto& m : c.at("messages")) {
      roles.push_back(m.at("role").get<std::string>());
      contents.push_back(m.at("content").get<std::string>());
    }
    std::vector<llama_chat_message> msgs;
    for (size_t i = 0; i < roles.size(); ++i) msgs.push_back({roles[i].c_str(), contents[i].c_str()});
    const bool add_ass = c.at("add_generation_prompt").get<bool>();
    std::string buf(4096, '\0');
    int32_t n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_ass, buf.data(),
                                          static_cast<int32_t>(buf.size()));
    if (n > static_cast<int32_t>(buf.size())) {
      buf.resize(n);
      n = llama_chat_apply_template(tmpl, msgs.data(), msgs.size(), add_ass, buf.data(), n);
    }
    json r;
    if (n < 0) {
      r["error"] = "llama_chat_apply_template failed";
    } else {
      buf.resize(n);
      r["text"] = buf;
    }
    chats.push_back(r);
  }
  out["chats"] = chats;

  std::cout << out.dump() << "\n";
  llama_model_free(model);
  llama_backend_free();
  return 0;
}
