#include "backends/process.h"

#include <fstream>
#include <iterator>

namespace deltavm {

std::string tail_of_log(const std::filesystem::path& log) {
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  if (text.size() > 800) text = "..." + text.substr(text.size() - 800);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text.empty() ? "(no output)" : text;
}

}  // namespace deltavm
