// One exception type for everything a user can cause (bad files, bad flags, over-long prompts).
// The CLI catches it at the top and prints its message as one line on stderr.
#pragma once
#include <stdexcept>
#include <string>

namespace qf {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// printf-free helper: qf::fail("tensor ", name, " is truncated") throws qf::Error.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::string msg;
  ((msg += [](const auto& a) {
     if constexpr (std::is_convertible_v<decltype(a), std::string_view>) return std::string(std::string_view(a));
     else return std::to_string(a);
   }(args)), ...);
  throw Error(msg);
}

}  // namespace qf
