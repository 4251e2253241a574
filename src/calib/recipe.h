// The calibration recipe shared by `qf calibrate` and the Python package: the seed prompts of
// text sampled from the model and the default document counts and lengths.
#pragma once

namespace qf::calib {

// Openings in varied registers (story, news, science, code, letters, dialogue, lists, maths, law)
// so that text sampled from them covers more than one kind of prose.
inline constexpr const char* kSeedPrompts[] = {
    "The history of the city begins",
    "Once upon a time, in a small village,",
    "Abstract. We study the problem of",
    "def parse_config(path):\n",
    "Dear Mr. Thompson,\n\nThank you for your letter of",
    "Q: What is the best way to learn a new language?\nA:",
    "Ingredients:\n- 2 cups of flour\n",
    "BREAKING NEWS: Officials confirmed on Tuesday that",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "In mathematics, a prime number is",
    "The committee met on the morning of",
    "#include <stdio.h>\n\nint main(void) {\n",
    "Section 2. Definitions. For the purposes of this Act,",
    "Here are five tips for staying healthy during the winter:\n1.",
    "\"Where are you going?\" she asked.",
    "The experiment was repeated with a larger sample,",
    "Photosynthesis is the process by which",
    "My grandfather used to tell me stories about",
    "The quarterly report shows that revenue",
    "To install the package, run the following command:",
    "The river flows through the valley and",
    "Ladies and gentlemen, it is an honor to",
    "The following table summarizes the results of",
    "She opened the old wooden box and found",
};

// Defaults. With text files: the reference's 20 documents of 2048 tokens. Sampled text costs a
// decoding step per token, so one document of 2048 tokens with a new seed prompt every 256: the
// filters depend far more on the range of positions the queries are taken at (rotary phases) than
// on the text, so on SmolLM2-135M this is at cosine 0.994 to natural-text filters (20 x 2048 SOTU
// addresses), while 4 x 512 sampled tokens are at 0.93 and 2 x 1024 at 0.97.
inline constexpr int kTextDocs = 20, kTextDocLen = 2048;
inline constexpr int kSampledDocs = 1, kSampledDocLen = 2048, kSampledSegment = 256;

}  // namespace qf::calib
