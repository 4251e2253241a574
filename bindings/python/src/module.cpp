// qfilters._qfilters: the extension module. The Python package (bindings/python/qfilters) wraps
// it with the documented API; this file only wires the pieces together.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common.h"
#include "kv/policy.h"
#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::py {

void check_interrupt() {
  if (PyErr_CheckSignals() != 0) throw nb::python_error();
}

void check_interrupt_nogil() {
  nb::gil_scoped_acquire gil;
  check_interrupt();
}

}  // namespace qf::py

NB_MODULE(_qfilters, m) {
  using namespace qf::py;
  m.doc() = "qfilters engine bindings (use the qfilters package, not this module)";
  // qf::Error carries the same one-line message the CLI prints.
  static nb::exception<qf::Error> error(m, "Error", PyExc_ValueError);
  m.def("policy_names", &qf::kv::policy_names, "Names of the KV cache policies this build knows.");
  m.def("query_stats_policy_names", &qf::kv::query_stats_policy_names,
        "Names of the policies that also need query statistics in the filter file.");
  m.def("is_policy_name", [](const std::string& name) { return qf::kv::is_policy_name(name); }, nb::arg("name"),
        "Whether the engine knows this KV policy name (+layer variants included).");
  m.def("simd_target", &qf::simd_target_name, "The SIMD instruction set the kernels dispatch to.");
  m.attr("__version__") = QF_VERSION;
  bind_model(m);
  bind_session(m);
  bind_filters(m);
  bind_evaluate(m);
}
