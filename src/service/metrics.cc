#include "service/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace deltavm {
namespace {

// Label values escape backslash, double quote and line feed (the text format's rules).
std::string escape(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string label_text(const Metrics::Labels& labels, const std::string& extra_name = "",
                       const std::string& extra_value = "") {
  std::string text;
  for (const auto& [name, value] : labels)
    text += fmt::format("{}{}=\"{}\"", text.empty() ? "" : ",", name, escape(value));
  if (!extra_name.empty()) text += fmt::format("{}{}=\"{}\"", text.empty() ? "" : ",", extra_name, extra_value);
  return text.empty() ? "" : "{" + text + "}";
}

std::string number(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) return fmt::format("{}", static_cast<int64_t>(value));
  return fmt::format("{}", value);
}

}  // namespace

void Metrics::declare(const std::string& name, const std::string& type, const std::string& help) {
  std::lock_guard lock(mutex_);
  Family& family = families_[name];
  family.type = type;
  family.help = help;
}

void Metrics::declare_histogram(const std::string& name, const std::string& help, std::vector<double> bounds) {
  std::lock_guard lock(mutex_);
  Family& family = families_[name];
  family.type = "histogram";
  family.help = help;
  std::sort(bounds.begin(), bounds.end());
  family.bounds = std::move(bounds);
}

void Metrics::add(const std::string& name, const Labels& labels, double amount) {
  std::lock_guard lock(mutex_);
  families_[name].values[labels] += amount;
}

void Metrics::set(const std::string& name, const Labels& labels, double value) {
  std::lock_guard lock(mutex_);
  families_[name].values[labels] = value;
}

void Metrics::observe(const std::string& name, const Labels& labels, double value) {
  std::lock_guard lock(mutex_);
  Family& family = families_[name];
  Histogram& histogram = family.histograms[labels];
  histogram.counts.resize(family.bounds.size());
  for (size_t i = 0; i < family.bounds.size(); ++i) {
    if (value <= family.bounds[i]) {
      ++histogram.counts[i];
      break;
    }
  }
  ++histogram.count;
  histogram.sum += value;
}

void Metrics::clear(const std::string& name) {
  std::lock_guard lock(mutex_);
  families_[name].values.clear();
}

std::string Metrics::render() const {
  std::lock_guard lock(mutex_);
  std::string out;
  for (const auto& [name, family] : families_) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, family.help, name, family.type);
    for (const auto& [labels, value] : family.values)
      out += fmt::format("{}{} {}\n", name, label_text(labels), number(value));
    for (const auto& [labels, histogram] : family.histograms) {
      uint64_t cumulative = 0;
      for (size_t i = 0; i < family.bounds.size(); ++i) {
        cumulative += i < histogram.counts.size() ? histogram.counts[i] : 0;
        out += fmt::format("{}_bucket{} {}\n", name, label_text(labels, "le", number(family.bounds[i])), cumulative);
      }
      out += fmt::format("{}_bucket{} {}\n", name, label_text(labels, "le", "+Inf"), histogram.count);
      out += fmt::format("{}_sum{} {}\n", name, label_text(labels), number(histogram.sum));
      out += fmt::format("{}_count{} {}\n", name, label_text(labels), histogram.count);
    }
  }
  return out;
}

}  // namespace deltavm
