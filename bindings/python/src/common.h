// Shared pieces of the qfilters extension module: the model wrapper every other object borrows,
// and the helpers that turn engine errors and Ctrl-C into Python exceptions.
#pragma once
#include <nanobind/nanobind.h>

#include <memory>
#include <mutex>
#include <string>

#include "runtime/engine.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace qf::py {

namespace nb = nanobind;

// One loaded model: the runtime engine (model + shared thread pool), its tokenizer and chat
// template. Compute runs with the GIL released, so `compute` serialises the threads that share
// the engine's pool (the engine requires one caller at a time).
struct PyModel {
  PyModel(const std::string& path, int threads, int n_ctx, int n_batch);

  runtime::Engine engine;
  Tokenizer tokenizer;
  std::mutex compute;
  const std::string path;
};

// Raises KeyboardInterrupt (or whatever a signal handler raised) in the calling C++ code.
// Call with the GIL held; the GIL-released sections call it through check_interrupt_nogil().
void check_interrupt();
void check_interrupt_nogil();

void bind_model(nb::module_& m);
void bind_session(nb::module_& m);
void bind_filters(nb::module_& m);
void bind_evaluate(nb::module_& m);

}  // namespace qf::py
