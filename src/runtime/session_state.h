// Saving a session's compressed state to a file and restoring it ("compress once, ask many"):
// the format is kv/state_file.h; here a state is taken from a Session and matched against one.
// Restoring and continuing gives logits bit-identical to never having saved, for every policy
// and KV storage type, provided the session continuing is built with the same options (model
// file, KV types, policy and parameters, filters; these are checked) and the same -b (the
// prefill chunk, which decides when streaming compression runs; not part of the state).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kv/state_file.h"
#include "model/model.h"
#include "model/session.h"
#include "runtime/engine.h"

namespace qf::runtime {

// 16 hex digits: FNV-1a 64 of every metadata key and value (architecture, hyper-parameters,
// tokenizer) and the tensor table (names, types, shapes, offsets). Two files with the same
// fingerprint hold the same model in the same quantization; the weights themselves are not read.
std::string model_fingerprint(const Model& model);

// What a state of this session is valid for (the header of its state file).
kv::StateConfig state_config(const Session& s, const std::string& model_fingerprint);

// The other direction: the KV options of a session that can restore a state saved with `c`.
// They are `base` (e.g. a server's options, which name the filter file: the state pins only its
// hash, checked when restoring) with the state's policy, parameters, per-layer weights and storage
// types; a type is named only where it differs from what `base` would store (its own name, else
// `engine`'s -ctk / -ctv), and base's --layer-weights spelling is kept where it gives the state's
// weights, so equal options compare equal. Throws qf::Error starting with `name` for a state saved
// with Q-Filters when `base` names no filter file (or for base options `engine` refuses).
KvOptions kv_options_for_state(const kv::StateConfig& c, KvOptions base, Engine& engine, std::string_view name);

// The session's state; `tokens` are the tokens it has read (n_past of them, or none).
kv::SessionState capture_state(const Session& s, const std::string& model_fingerprint,
                               std::span<const int32_t> tokens);

// Makes `s` continue from `state`. Everything is checked before anything changes: a state for
// another model, KV type, shape or policy, or one that does not fit the session's context or
// cache, throws qf::Error starting with `name` and leaves the session as it was.
void restore_state(Session& s, const kv::SessionState& state, const std::string& model_fingerprint,
                   std::string_view name);

// Writes the state to `path` (a temporary file renamed into place, so a reader never sees half
// a file). Returns the bytes written. Throws qf::Error when the file cannot be written.
size_t save_state_file(const std::string& path, const Session& s, const std::string& model_fingerprint,
                       std::span<const int32_t> tokens);

// Reads `path`, checks it and restores it into `s`; returns the state (its tokens: what the
// session has read). Throws qf::Error (session unchanged) for a missing, corrupt or foreign file.
kv::SessionState load_state_file(const std::string& path, Session& s, const std::string& model_fingerprint);

}  // namespace qf::runtime
