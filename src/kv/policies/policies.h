// Factories of the built-in policies, one per file in this folder; make_policy() dispatches.
#pragma once
#include <memory>

#include "kv/policy.h"

namespace qf::kv::policies {

std::unique_ptr<Policy> make_qfilters(const PolicyOptions&);
std::unique_ptr<Policy> make_knorm(const PolicyOptions&);
std::unique_ptr<Policy> make_streaming(const PolicyOptions&);
std::unique_ptr<Policy> make_random(const PolicyOptions&);
std::unique_ptr<Policy> make_snapkv(const PolicyOptions&);
std::unique_ptr<Policy> make_tova(const PolicyOptions&);
std::unique_ptr<Policy> make_h2o(const PolicyOptions&);

}  // namespace qf::kv::policies
