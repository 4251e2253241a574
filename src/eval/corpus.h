// Evaluation text: plain-text files, by default the State of the Union addresses from 2000 on
// (data/sotu/YYYY_name.txt), held out from the calibration text (addresses before 1950).
#pragma once
#include <string>
#include <vector>

namespace qf::eval {

struct Document {
  std::string name;  // file name without directory
  std::string text;
};

// Year a file name starts with ("2001_george_w_bush_r.txt" -> 2001), or -1 when it does not
// start with four digits and an underscore.
int year_of(const std::string& file_name);

// Every path is a file or a directory (its *.txt files). Files whose name starts with a year
// outside [min_year, max_year] are left out (0 = no bound); files without a year are kept.
// Sorted by file name. Throws qf::Error when a path is missing or nothing is left.
std::vector<Document> load_documents(const std::vector<std::string>& paths, int min_year = 0, int max_year = 0);

}  // namespace qf::eval
