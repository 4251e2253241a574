// libFuzzer harness: the GGUF reader (header, metadata, tensor table) on arbitrary bytes, and
// what is built from metadata alone (tokenizer, chat template). Any input must either parse or
// throw qf::Error; a crash, leak, hang or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>

#include "gguf/gguf.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace {

// Touches everything a caller could read from a file that opened.
void read_everything(const qf::gguf::File& file) {
  for (const auto& [key, value] : file.metadata()) {
    (void)qf::gguf::to_string(value);
    (void)file.find(key);
  }
  for (const qf::gguf::TensorInfo& t : file.tensors()) {
    (void)t.n_elements();
    (void)file.find_tensor(t.name);
    if (t.nbytes > 0) {
      volatile uint8_t first = t.data[0], last = t.data[t.nbytes - 1];  // inside the file
      (void)first;
      (void)last;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<qf::gguf::File> file;
  try {
    file = qf::gguf::File::from_memory(data, size);
  } catch (const qf::Error&) {
    return 0;
  }
  read_everything(*file);
  try {
    const qf::Tokenizer tok = qf::Tokenizer::from_gguf(*file);
    (void)tok.encode("Hello world <|im_end|> 123", true, true);
  } catch (const qf::Error&) {
  }
  try {
    (void)qf::ChatTemplate::from_gguf(*file);
  } catch (const qf::Error&) {
  }
  return 0;
}
