// qfilters.Model: a GGUF model, its tokenizer and chat template.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <vector>

#include "common.h"
#include "util/error.h"

namespace qf::py {

namespace {

runtime::ModelOptions model_options(const std::string& path, int threads, int n_ctx, int n_batch) {
  if (threads < 0) fail("threads must be >= 0 (0 = all cores)");
  runtime::ModelOptions o;
  o.model = path;
  o.n_threads = threads;
  o.n_ctx = n_ctx;
  o.n_batch = n_batch;
  return o;
}

nb::dict metadata(const PyModel& m) {
  const ModelConfig& c = m.engine.model().config();
  nb::dict d;
  d["path"] = m.path;
  d["architecture"] = c.arch;
  d["name"] = c.name;
  d["n_layers"] = c.n_layers;
  d["n_embd"] = c.n_embd;
  d["n_heads"] = c.n_heads;
  d["n_kv_heads"] = c.n_kv_heads;
  d["head_dim"] = c.head_dim;
  d["n_ff"] = c.n_ff;
  d["n_vocab"] = c.n_vocab;
  d["n_ctx_train"] = c.n_ctx_train;
  d["rope_base"] = c.rope_base;
  d["fingerprint"] = c.fingerprint();
  d["bos"] = m.tokenizer.bos();
  d["eos"] = m.tokenizer.eos();
  d["eog"] = m.tokenizer.eog_ids();
  return d;
}

std::string apply_template(const PyModel& m, const nb::list& messages, bool add_generation_prompt) {
  std::vector<ChatMessage> msgs;
  for (nb::handle item : messages) {
    if (!nb::isinstance<nb::dict>(item)) fail("messages must be dicts with 'role' and 'content'");
    nb::dict d = nb::borrow<nb::dict>(item);
    if (!d.contains("role") || !d.contains("content")) fail("every message needs 'role' and 'content'");
    msgs.push_back({nb::cast<std::string>(d["role"]), nb::cast<std::string>(d["content"])});
  }
  return ChatTemplate::from_tokenizer(m.tokenizer).apply(msgs, add_generation_prompt);
}

}  // namespace

PyModel::PyModel(const std::string& p, int threads, int n_ctx, int n_batch)
    : engine(model_options(p, threads, n_ctx, n_batch)), tokenizer(Tokenizer::from_gguf(engine.model().file())), path(p) {}

void bind_model(nb::module_& m) {
  nb::class_<PyModel>(m, "Model")
      .def(nb::init<const std::string&, int, int, int>(), nb::arg("path"), nb::arg("threads") = 0,
           nb::arg("n_ctx") = 0, nb::arg("n_batch") = 256, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("metadata", &metadata)
      .def_prop_ro("n_vocab", [](const PyModel& self) { return self.engine.model().config().n_vocab; })
      .def_prop_ro("n_ctx", [](const PyModel& self) { return self.engine.n_ctx(); })
      .def_prop_ro("threads", [](PyModel& self) { return self.engine.pool().size(); })
      .def_prop_ro("chat_template", [](const PyModel& self) { return self.tokenizer.chat_template(); })
      .def("tokenize",
           [](const PyModel& self, const std::string& text, bool add_special, bool special) {
             return self.tokenizer.encode(text, add_special, special);
           },
           nb::arg("text"), nb::arg("add_special") = true, nb::arg("special") = true)
      .def("detokenize",
           [](const PyModel& self, const std::vector<int32_t>& ids, bool render_special) {
             const int n_vocab = self.tokenizer.n_vocab();
             for (int32_t id : ids)
               if (id < 0 || id >= n_vocab) fail("token id ", id, " is outside the vocabulary (", n_vocab, ")");
             return self.tokenizer.decode(ids, render_special);
           },
           nb::arg("ids"), nb::arg("render_special") = true)
      .def("is_eog", [](const PyModel& self, int32_t id) { return self.tokenizer.is_eog(id); }, nb::arg("id"))
      .def("apply_chat_template", &apply_template, nb::arg("messages"), nb::arg("add_generation_prompt") = true);
}

}  // namespace qf::py
